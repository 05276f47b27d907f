"""CPU model and accelerator per VM (``--cpu``, ``--accel``, ``WAYMARK_ACCEL``), and a silent
guest named by ``vm status``, through the real CLI and a real ``waymark serve``.

The tests marked ``guest`` start ``qemu-system-x86_64`` with no guest OS: a VM without a disk or
kernel runs SeaBIOS, which finds nothing to boot and prints nothing on the serial console, a
real silent guest (no QEMU behaviour is faked)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import Waymark, query, serve_process

EXIT_INVALID, EXIT_CONFLICT = 2, 5


def config_of(wm: Waymark, name: str) -> dict[str, Any]:
    ((raw,),) = query(wm.home, "SELECT config FROM vms WHERE name = ?", name)
    config: dict[str, Any] = json.loads(raw)
    return config


def set_config(wm: Waymark, name: str, **changes: Any) -> None:
    """Write the VM's configuration as a VM moved from another host could have it."""
    config = {**config_of(wm, name), **changes}
    with sqlite3.connect(wm.home / "catalog.db") as con:
        con.execute("UPDATE vms SET config = ? WHERE name = ?", (json.dumps(config), name))
    con.close()


def refused(wm: Waymark, code: int, *args: str, says: tuple[str, ...],
            env: dict[str, str] | None = None) -> None:
    """``args`` fails with ``code`` naming each of ``says``, and no VM's configuration changed."""
    before = query(wm.home, "SELECT name, config FROM vms ORDER BY name")
    result = wm.run(*args, env=env)
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result
    for fragment in says:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr}"
    assert query(wm.home, "SELECT name, config FROM vms ORDER BY name") == before


def test_a_new_vm_gets_the_default_cpu_model_and_vm_set_pins_another(wm: Waymark) -> None:
    """A new VM runs Westmere (x86-64-v2 + AES) and ``auto``; ``--cpu``/``--accel`` choose,
    ``vm set`` changes them (the VM is off), and ``vm show`` shows both with the accelerator in
    use (none: it does not run)."""
    shown = wm.json("vm", "create", "plain")
    assert (shown["cpu_model"], shown["accel"], shown["accelerator"]) == ("Westmere", "auto", None)
    shown = wm.json("vm", "create", "old", "--cpu", "qemu64", "--accel", "tcg")
    assert (shown["cpu_model"], shown["accel"]) == ("qemu64", "tcg")
    shown = wm.json("vm", "set", "old", "--cpu", "Skylake-Client", "--accel", "kvm")
    assert (shown["cpu_model"], shown["accel"]) == ("Skylake-Client", "kvm")
    assert config_of(wm, "old")["cpu_model"] == "Skylake-Client"
    text = wm("vm", "show", "old").stdout
    assert "CPU model: Skylake-Client" in text and "accelerator: kvm\n" in text, text
    shown = wm.json("vm", "set", "old", "--accel", "auto")  # one changes, the other stays
    assert (shown["cpu_model"], shown["accel"]) == ("Skylake-Client", "auto")


@pytest.mark.parametrize("model", ["qemu64,+vmx", "host,migratable=off", "../qemu64", "-help",
                                   "", "a" * 65])
def test_a_cpu_model_that_is_no_model_name_is_refused(wm: Waymark, model: str) -> None:
    """A name reaches QEMU's -cpu: nothing but a model name (no properties, no options)."""
    wm("vm", "create", "web")
    says = ("is not a QEMU CPU model name", "--cpu Westmere")
    refused(wm, EXIT_INVALID, "vm", "create", "other", "--cpu", model, says=says)
    refused(wm, EXIT_INVALID, "vm", "set", "web", "--cpu", model, says=says)
    assert query(wm.home, "SELECT name FROM vms") == [("web",)]


def test_an_unknown_accelerator_is_refused_on_the_command_line_and_in_the_environment(
        wm: Waymark) -> None:
    wm("vm", "create", "web")
    refused(wm, EXIT_INVALID, "vm", "set", "web", "--accel", "xen", says=("'xen'",))
    refused(wm, EXIT_INVALID, "vm", "list", says=("WAYMARK_ACCEL='hvf'", "auto, kvm, tcg"),
            env=wm.env(WAYMARK_ACCEL="hvf"))


def test_applying_a_checkpoint_restores_the_cpu_model_and_accelerator_it_was_taken_with(
        wm: Waymark) -> None:
    """The checkpoint records the hardware: after ``vm set --cpu B`` applying a checkpoint
    taken with model A gives A back (a memory state restores only on its model; the guest test
    proves it with a standard checkpoint of a running guest)."""
    wm("vm", "create", "web", "--disk", "1M", "--cpu", "qemu64")
    wm("checkpoint", "create", "web", "--name", "on-qemu64")
    wm("vm", "set", "web", "--cpu", "Westmere", "--accel", "tcg")
    wm("checkpoint", "apply", "web", "on-qemu64", "--discard-current")
    shown = wm.json("vm", "show", "web")
    assert (shown["cpu_model"], shown["accel"]) == ("qemu64", "auto")


def test_the_api_sets_the_cpu_model_and_accelerator_and_refuses_other_names(
        wm: Waymark, admin_token: str) -> None:
    wm("vm", "create", "web")
    with serve_process(wm) as url:
        def patch(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            request = urllib.request.Request(
                f"{url}/api/vms/web", data=json.dumps(body).encode(), method="PATCH",
                headers={"Authorization": f"Bearer {admin_token}",
                         "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, shown = patch({"cpu_model": "qemu64", "accel": "tcg"})
        assert status == 200 and (shown["cpu_model"], shown["accel"]) == ("qemu64", "tcg")
        assert shown["accelerator"] is None
        for bad in ({"cpu_model": "qemu64,+vmx"}, {"accel": "xen"}):
            status, error = patch(bad)
            assert status in (400, 422), (bad, status, error)
    assert (config_of(wm, "web")["cpu_model"], config_of(wm, "web")["accel"]) == ("qemu64",
                                                                                  "tcg")


@pytest.mark.guest  # asks qemu-system-x86_64 -cpu help (no guest runs)
def test_a_cpu_model_this_qemu_does_not_offer_is_refused_naming_some_it_does(
        wm: Waymark) -> None:
    wm("vm", "create", "web")
    says = ("this host's QEMU has no CPU model 'Pentium9000'", "Westmere, Skylake-Client")
    refused(wm, EXIT_INVALID, "vm", "create", "other", "--cpu", "Pentium9000", says=says)
    refused(wm, EXIT_INVALID, "vm", "set", "web", "--cpu", "Pentium9000", says=says)
    assert (wm.home / "run" / "cpu-models.json").is_file(), "the list is cached"
    shown = wm.json("vm", "create", "max", "--cpu", "max")  # QEMU's own names are all there
    assert shown["cpu_model"] == "max"


@pytest.fixture
def admin_token(wm: Waymark) -> str:
    wm.run("user", "add", "root-admin", "--role", "administrator", "--password-stdin",
           input="test-password\n").ok()
    token: str = wm.json("token", "create", "tests", "--user", "root-admin")["token"]
    return token


@pytest.fixture
def quiet(wm: Waymark) -> Iterator[dict[str, str]]:
    """VM ``quiet`` (no disk, no kernel: SeaBIOS finds nothing and prints nothing), and the
    environment that makes this host run it under TCG and call 2 s of silence silent."""
    wm("vm", "create", "quiet", "--memory", "64M", "--nic", "none")
    env = wm.env(WAYMARK_ACCEL="tcg", WAYMARK_SILENT_SECONDS="2")
    yield env
    wm.run("vm", "stop", "quiet", "--force")


def _status(url: str, token: str, vm: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/api/vms/{vm}/status",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        data: dict[str, Any] = json.loads(answer.read())
    return data


@pytest.mark.guest  # starts qemu-system-x86_64 (SeaBIOS only, no guest OS)
def test_a_silent_guest_is_named_by_vm_status_with_its_accelerator_and_serial_log(
        wm: Waymark, quiet: dict[str, str], admin_token: str) -> None:
    """No serial output and no agent answer for WAYMARK_SILENT_SECONDS: ``vm status`` (CLI
    text and JSON, and GET /api/vms/{vm}/status) says so, with the accelerator in use, why it
    was chosen (the host's WAYMARK_ACCEL), the serial log, and what to do."""
    started = wm.run("vm", "start", "quiet", "--json", env=quiet).ok().json()
    assert started["accelerator"] == "tcg"
    assert started["accelerator_reason"] == "asked for by WAYMARK_ACCEL"
    assert started["silence"] is None  # just started
    shown = wm.json("vm", "show", "quiet")
    assert (shown["accel"], shown["accelerator"]) == ("auto", "tcg")
    time.sleep(2.5)
    status = wm.run("vm", "status", "quiet", "--json", env=quiet).ok().json()
    silence = status["silence"]
    assert silence is not None and silence["seconds"] >= 2, status
    assert "no sign of life" in silence["message"] and "under tcg" in silence["message"]
    assert status["serial_log"] in silence["message"]
    assert "console=ttyS0" in silence["hint"] and "vm stop quiet --force" in silence["hint"]
    text = wm.run("vm", "status", "quiet", env=quiet).ok().stdout
    assert "warning: no sign of life from the guest" in text, text
    assert "accelerator: tcg (asked for by WAYMARK_ACCEL)" in text, text
    with serve_process(wm, env={"WAYMARK_ACCEL": "tcg", "WAYMARK_SILENT_SECONDS": "2"}) as url:
        answer = _status(url, admin_token, "quiet")
        remote = wm.run("vm", "status", "quiet", env=wm.env(WAYMARK_SERVER=url,
                                                              WAYMARK_TOKEN=admin_token)).ok()
    assert answer["silence"]["message"].startswith("no sign of life"), answer
    assert answer["accelerator"] == "tcg"
    assert "warning: no sign of life from the guest" in remote.stdout, remote
    with serve_process(wm) as url:  # the default: 60 s of silence, not reached yet
        assert _status(url, admin_token, "quiet")["silence"] is None
    # the hardware changes only while it is off
    refused(wm, EXIT_CONFLICT, "vm", "set", "quiet", "--cpu", "qemu64",
            says=("--cpu takes effect only after a power cycle",))
    refused(wm, EXIT_CONFLICT, "vm", "set", "quiet", "--accel", "kvm",
            says=("--accel takes effect only after a power cycle",))


@pytest.mark.guest  # starts qemu-system-x86_64 (SeaBIOS only, no guest OS)
def test_a_vm_set_to_tcg_runs_under_tcg_whatever_the_host_default(
        wm: Waymark, quiet: dict[str, str]) -> None:
    wm("vm", "set", "quiet", "--accel", "tcg")
    started = wm.run("vm", "start", "quiet", "--json", env=wm.env(WAYMARK_ACCEL="kvm")).ok()
    assert started.json()["accelerator"] == "tcg"
    assert started.json()["accelerator_reason"] == "asked for by the VM's --accel"
    serial = (wm.home / "vms" / started.json()["id"] / "run" / "serial.log").read_text()
    assert "(tcg: asked for by the VM's --accel; CPU Westmere) ---" in serial


@pytest.mark.guest  # asks qemu-system-x86_64 -cpu help; no QEMU may start
def test_a_vm_whose_cpu_model_cannot_run_here_does_not_start(
        wm: Waymark, quiet: dict[str, str]) -> None:
    """A configuration from another host (a newer QEMU's model, or ``host`` under TCG) is a
    clear error at start naming the model and the way out; no QEMU is left behind."""
    set_config(wm, "quiet", cpu_model="Pentium9000")
    refused(wm, EXIT_CONFLICT, "vm", "start", "quiet", env=quiet,
            says=("CPU model 'Pentium9000', which this host's QEMU does not offer",
                  "waymark vm set quiet --cpu MODEL"))
    set_config(wm, "quiet", cpu_model="host")
    refused(wm, EXIT_CONFLICT, "vm", "start", "quiet", env=quiet,
            says=("'host', which runs only under KVM, and it would run under tcg",
                  "--cpu Westmere"))
    assert wm.json("vm", "status", "quiet")["pid"] is None


@pytest.mark.guest  # starts qemu-system-x86_64 under KVM (SeaBIOS only, no guest OS)
def test_a_silent_guest_under_kvm_is_told_to_try_tcg(wm: Waymark, quiet: dict[str, str]) -> None:
    """A VM asked to run under KVM, silent: the hint is ``vm set --accel tcg``. (Here no
    kernel file exists to probe with, so ``--accel kvm`` runs unprobed and SeaBIOS, which runs
    under KVM on this host, finds nothing to boot and prints nothing.)"""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is absent or not usable here: nothing runs under KVM")
    wm("vm", "set", "quiet", "--accel", "kvm")
    started = wm.run("vm", "start", "quiet", "--json", env=quiet)
    if started.returncode == 5 and "KVM does not work on this host" in started.stderr:
        pytest.skip("this host has a kernel to probe KVM with, and KVM does not run it")
    assert started.ok().json()["accelerator"] == "kvm"
    time.sleep(2.5)
    silence = wm.run("vm", "status", "quiet", "--json", env=quiet).ok().json()["silence"]
    assert silence is not None and "under kvm" in silence["message"], silence
    assert "waymark vm stop quiet --force, then waymark vm set quiet --accel tcg" \
        in silence["hint"], silence
