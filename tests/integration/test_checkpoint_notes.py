"""A checkpoint's notes (Hyper-V's Notes, SCVMM's -Description), through the real CLI (also
through a real ``waymark serve`` with ``--server``), the API, bundles and library shares:

- written at create (``--notes``, ``-`` from stdin) and later (``checkpoint notes``), cleared
  (``--clear``), read back (``checkpoint notes VM CKPT``), shown whole by ``show``, as a short
  first line by ``list`` (cut to the terminal's width), in every JSON answer;
- hostile notes (escape sequences, a lone carriage return, a bidi override, more than 4,000
  characters) refused with a clear error, nothing changed;
- the API: ``notes`` in create's body, ``PATCH`` of the checkpoint sets, clears (null or "") and
  refuses; a name and notes in one PATCH are checked before either changes; a user without the
  permission rename needs cannot change them (403);
- a checkpoint of Now taken first says what it was taken before;
- export/import and store/deploy keep them; a bundle or a share carrying hostile notes is
  refused, nothing changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Waymark, query, served
from waymark.model.notes import MAX_NOTES, width

NOTES = "Before the 4.2 upgrade\n\tdatabase schema v3 — ticket #1234\nrollback: apply this"
HOSTILE = {"escape": "ok\x1b[2J\x1b]0;pwned\x07", "carriage return": "shown\rhidden",
           "bidi": "evil \u202etxt.exe", "line separator": "a\u2028b",
           "too long": "x" * (MAX_NOTES + 1)}
SAYS = {"escape": "U+001B on line 1, a control character",
        "carriage return": "U+000D on line 1, a control character",
        "bidi": "U+202E (RIGHT-TO-LEFT OVERRIDE) on line 1, an invisible formatting character",
        "line separator": "U+2028 (LINE SEPARATOR) on line 1, a line separator",
        "too long": f"at most {MAX_NOTES}"}  # (the API's own check says it so too)


def two_checkpoints(wm: Waymark) -> None:
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    wm("checkpoint", "create", "web", "--name", "first", "--notes", NOTES)
    wm("checkpoint", "create", "web", "--name", "second")


@pytest.mark.also_served
def test_notes_are_written_shown_changed_and_cleared(wm: Waymark) -> None:
    two_checkpoints(wm)
    first, second = wm.json("checkpoint", "list", "web")["checkpoints"]
    assert (first["notes"], second["notes"]) == (NOTES, None)
    shown = wm("checkpoint", "show", "web", "first").stdout
    assert "  notes:\n    Before the 4.2 upgrade\n    \tdatabase schema v3 — ticket #1234\n" \
           "    rollback: apply this\n" in shown
    assert "  notes:" not in wm("checkpoint", "show", "web", "second").stdout
    assert wm("checkpoint", "notes", "web", "first").stdout == NOTES + "\n"
    assert wm.json("checkpoint", "show", "web", "first")["notes"] == NOTES

    changed = wm("checkpoint", "notes", "web", "second", "  known good \r\n  second line  ")
    assert changed.stdout == f"Set the notes of checkpoint 'second' ({second['id'][:12]}).\n"
    assert wm.json("checkpoint", "show", "web", "second")["notes"] == "known good \n  second line"
    from_stdin = wm.run("checkpoint", "notes", "web", "second", "-", "--json",
                        input="line one\nline two\n").ok().json()
    assert from_stdin["notes"] == "line one\nline two"
    cleared = wm.json("checkpoint", "notes", "web", "second", "--clear")
    assert cleared["notes"] is None and cleared["name"] == "second"
    assert wm("checkpoint", "notes", "web", "second").stdout == ""
    both = wm.run("checkpoint", "notes", "web", "second", "x", "--clear")
    assert both.returncode == 2 and "not both" in both.stderr


@pytest.mark.also_served
@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_hostile_notes_are_refused_and_change_nothing(wm: Waymark, what: str) -> None:
    two_checkpoints(wm)
    before = wm.json("checkpoint", "list", "web")
    for args in (("checkpoint", "create", "web", "--notes", HOSTILE[what]),
                 ("checkpoint", "notes", "web", "first", HOSTILE[what])):
        refused = wm.run(*args)
        assert refused.returncode == 2, refused
        assert SAYS[what] in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and "\x1b" not in refused.stderr
    assert wm.json("checkpoint", "list", "web") == before


def test_list_shows_the_first_line_cut_to_the_terminal(wm: Waymark) -> None:
    two_checkpoints(wm)
    wm("checkpoint", "notes", "web", "second", "日本語のメモ " * 20)
    for columns in (60, 90, 200):
        lines = wm.run("checkpoint", "list", "web", env=wm.env(COLUMNS=str(columns))
                       ).ok().stdout.splitlines()
        [first] = [line for line in lines if "■ first" in line]
        [second] = [line for line in lines if "■ second" in line]
        assert all(width(line) <= columns for line in lines), (columns, lines)
        assert "— Before the" in first and first.endswith("…"), first  # more lines follow
        assert second.endswith("…") and "日本語" in second, second
    assert first.endswith("— Before the 4.2 upgrade…")  # at 200 columns: all of it
    narrow = wm.run("checkpoint", "list", "web", env=wm.env(COLUMNS="50")).ok().stdout
    assert "—" not in narrow  # no room left beside the tree: the notes are left out


def test_a_checkpoint_of_now_taken_first_says_what_it_was_taken_before(wm: Waymark) -> None:
    two_checkpoints(wm)
    applied = wm.json("checkpoint", "apply", "web", "first", "--checkpoint-first")
    safety = wm.json("checkpoint", "show", "web", applied["safety_checkpoint_id"])
    assert safety["notes"] == ("Now as it was before applying checkpoint 'first' (taken "
                               "first, to go back to).")


def test_the_api_takes_changes_and_clears_notes(wm: Waymark) -> None:
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    wm.run("user", "add", "ro", "--role", "self-service", "--password-stdin",
           input="a long enough password\n").ok()
    wm("user", "grant", "ro", "--vm", "web", "--permission", "checkpoint-restore-only")
    restore_only = wm.json("token", "create", "t", "--user", "ro")["token"]
    with served(wm) as (url, token), httpx.Client(
            base_url=f"{url}/api/vms/web", timeout=60,
            headers={"Authorization": f"Bearer {token}"}) as api:
        made = api.post("/checkpoints", json={"name": "one", "notes": NOTES})
        assert made.status_code == 201 and made.json()["notes"] == NOTES
        assert api.get("/checkpoints").json()["checkpoints"][0]["notes"] == NOTES

        def patch(body: dict[str, Any], status: int = 200) -> dict[str, Any]:
            answer = api.patch("/checkpoints/one", json=body)
            assert answer.status_code == status, answer.text
            return dict(answer.json())

        assert patch({"notes": "new\nnotes"})["notes"] == "new\nnotes"
        assert patch({"name": "one"})["notes"] == "new\nnotes"  # absent: unchanged
        assert patch({"notes": None})["notes"] is None
        patch({"notes": "again"})
        assert patch({"notes": ""})["notes"] is None
        error = patch({"name": "renamed", "notes": HOSTILE["escape"]}, 400)["error"]
        assert "U+001B" in error["message"] and "printable" in error["hint"]
        assert api.get("/checkpoints/one").json()["name"] == "one"  # both checked first
        assert "nothing to change" in patch({}, 400)["error"]["message"]
        assert "at most 4000" in patch({"notes": "x" * (MAX_NOTES + 1)}, 400)["error"]["message"]
        refused = api.patch("/checkpoints/one", json={"notes": "mine"},
                            headers={"Authorization": f"Bearer {restore_only}"})
        assert refused.status_code == 403, refused.text
        assert api.get("/checkpoints/one").json()["notes"] is None


def test_export_and_import_keep_the_notes_and_refuse_hostile_ones(wm: Waymark,
                                                                  tmp_path: Path) -> None:
    two_checkpoints(wm)
    bundle = tmp_path / "bundle"
    wm("checkpoint", "export", "web", "first", str(bundle))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["checkpoint_notes"] == NOTES
    imported = wm("vm", "import", str(bundle), "--name", "clone").stdout
    assert "The exported checkpoint's notes:\n  Before the 4.2 upgrade\n" in imported
    assert wm.json("vm", "import", str(bundle), "--name", "clone2")["checkpoint_notes"] == NOTES

    manifest["source"]["checkpoint_notes"] = HOSTILE["escape"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    vms = query(wm.home, "SELECT id FROM vms ORDER BY id")
    refused = wm.run("vm", "import", str(bundle), "--name", "clone3")
    assert refused.returncode == 8, refused
    assert "notes are refused" in refused.stderr and "U+001B" in refused.stderr
    assert query(wm.home, "SELECT id FROM vms ORDER BY id") == vms


def test_store_and_deploy_keep_the_notes(wm: Waymark, tmp_path: Path) -> None:
    two_checkpoints(wm)
    library = tmp_path / "lib"
    wm("library", "init", str(library))
    wm("vm", "store", "web", "--library", str(library))
    [stored] = wm.json("library", "list", "--library", str(library))["vms"]
    assert [c["notes"] for c in stored["checkpoints"]] == [NOTES, None]
    listed = wm.run("library", "list", "--library", str(library),
                    env=wm.env(COLUMNS="120")).ok().stdout
    assert "— Before the 4.2 upgrade…" in listed
    wm("vm", "deploy", "web", "--library", str(library))
    assert wm.json("checkpoint", "show", "web", "first")["notes"] == NOTES
