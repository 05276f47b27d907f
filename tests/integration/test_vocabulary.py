"""Every delete answers one shape, with ``--json`` as on the API (docs/api.md, "The JSON
vocabulary"): ``{"deleted": [{"kind", "id", "name"}]}``, naming what went, whatever it was."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Waymark


def gone(kind: str, name: str, id_: str | None = None) -> dict[str, list[dict[str, str | None]]]:
    return {"deleted": [{"kind": kind, "id": id_, "name": name}]}


def test_every_cli_delete_answers_what_went_in_one_shape(wm: Waymark, tmp_path: Path) -> None:
    vm_id = wm.json("vm", "create", "web", "--disk", "1M")["id"]
    ckpt_id = wm.json("checkpoint", "create", "web", "--name", "one")["id"]
    user_id = wm.run("user", "add", "ada", "--role", "read-only", "--password-stdin", "--json",
                     input="ada-password-1\n").ok().json()["id"]
    token_id = wm.json("token", "create", "script", "--user", "ada")["id"]
    wm("backup", "repo", "init", str(tmp_path / "repo"))
    wm("location", "add", "repo", str(tmp_path / "repo"), "--kind", "repository")
    wm("backup", "schedule", "add", "nightly", "--vm", "web", "--repo", str(tmp_path / "repo"),
       "--daily", "03:00")
    wm("profile", "create", "small", "--cpus", "1")

    checkpoint = wm.json("checkpoint", "delete", "web", "one")
    # the CLI waited for the merge job: it adds the space freed
    assert checkpoint == {**gone("checkpoint", "one", ckpt_id), "job_id": checkpoint["job_id"],
                          "freed_bytes": checkpoint["freed_bytes"]}
    assert isinstance(checkpoint["freed_bytes"], int)
    assert wm.json("token", "revoke", token_id) == gone("token", "script", token_id)
    assert wm.json("user", "remove", "ada") == gone("user", "ada", user_id)
    assert wm.json("backup", "schedule", "remove", "nightly") == gone("schedule", "nightly")
    assert wm.json("location", "remove", "repo") == gone("location", "repo")
    assert wm.json("profile", "delete", "small") == gone("profile", "small")
    assert wm.json("vm", "delete", "web", "--yes") == gone("vm", "web", vm_id)
    # and as text, as before
    wm("profile", "create", "tiny", "--cpus", "1")
    assert wm("profile", "delete", "tiny").stdout == "Deleted hardware profile tiny.\n"
