"""``waymark``: the root command, its global options, and the error boundary.

The only imports inside functions in ``src/`` are the CLI's lazy loading, which keeps
``waymark --help`` and the light commands fast (docs/architecture.md, "Lazy imports"):
:class:`LazyGroup` imports a command group's module when that group runs; :class:`Face` imports
the composition root (and with it the engine) when a command first needs the context, the
HTTP client only with ``--server``, and the read path (:mod:`waymark.engine.reading`: the stdlib's
sqlite3, no ORM) when a command only reads or a VM is named;
``waymark serve`` imports the HTTP server and the schedules when it serves, and
``waymark guest`` the test guest builder when it builds.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, ClassVar, NoReturn

import click

from waymark import __version__, failpoints, modes
from waymark.errors import InvalidInput, WaymarkError, envelope
from waymark.text import printable

if TYPE_CHECKING:
    from waymark.client import Client
    from waymark.engine.context import Context
    from waymark.engine.reading import Home, Source


class Face:
    """Per-invocation state: settings now, the (lazily opened) ops context when needed, or,
    with ``--server``, a client of that server's API (:mod:`waymark.client`)."""

    def __init__(self, home: str | None, server: str | None = None,
                 token: str | None = None) -> None:
        self._home = home
        self._ctx: Context | None = None
        self._home_read: Home | None = None
        self.server, self.token = server, token
        self._client: Client | None = None

    @property
    def remote(self) -> Client | None:
        """The server's client when ``--server`` (or ``WAYMARK_SERVER``) is given."""
        if self.server is None:
            return None
        if self._client is None:
            from waymark.client import Client

            self._client = Client(self.server, self.token)
        return self._client

    @property
    def ctx(self) -> Context:
        if self.server is not None:
            path = click.get_current_context().command_path
            raise InvalidInput(f"'{path}' works only on the Waymark host, not through --server.",
                               hint="Run it there, or without --server / WAYMARK_SERVER.")
        if self._ctx is None:  # lazy: loading the use cases costs ``--help`` nothing
            from waymark import wiring
            from waymark.config import Settings

            self._ctx = wiring.open_context(Settings.from_env(self._home))
        return self._ctx

    @property
    def reading(self) -> Source:
        """What a command that only reads reads from: the home opened for reading
        (:func:`waymark.engine.reading.open_home`: no ORM, no engine), or the full context when
        one is open or the home needs one first (a migration, unfinished work to settle)."""
        if self._ctx is not None or self.server is not None:
            return self.ctx
        if self._home_read is None:
            from waymark.config import Settings
            from waymark.engine import reading

            self._home_read = reading.open_home(Settings.from_env(self._home))
        return self._home_read if self._home_read is not None else self.ctx

    def close(self) -> None:
        """Let go of the catalog's connections when the command ends."""
        if self._home_read is not None:
            self._home_read.close()
            self._home_read = None
        if self._ctx is not None:
            self._ctx.catalog.close()
            self._ctx = None

    def vm_id(self, ref: str) -> str:
        """The id of the VM ``ref`` names (a full id, else a name, else an id prefix:
        :func:`waymark.engine.reading.vm`), resolved once here, as root; the use cases take
        it."""
        from waymark.engine import reading

        with self.reading.reading() as reader:
            return reading.vm(reader, ref).id


def face() -> Face:
    obj = click.get_current_context().find_root().obj
    assert isinstance(obj, Face)
    return obj


class LazyGroup(click.Group):
    """Loads a command's module only when that command runs, so ``--help`` stays fast: the
    root's command groups, and a group's commands that need use cases its other commands do
    not (``waymark checkpoint``: its listing loads no use case that changes checkpoints). A
    subclass lists its own ``COMMANDS``; commands added to it with ``@group.command`` load with
    it."""

    COMMANDS: ClassVar[dict[str, tuple[str, str, str]]] = {
        "vm": ("waymark.cli.vm", "vm", "Virtual machines: hardware, disks, checkpoint settings."),
        "checkpoint": ("waymark.cli.checkpoint", "checkpoint",
                       "Checkpoints: take, list, apply, rename, delete, export."),
        "audit": ("waymark.cli.users", "audit",
                  "The API's audit log: who did what, when, from where, with what result."),
        "backup": ("waymark.cli.backup", "backup",
                   "Backups to external storage: repo init, run, list, verify, restore."),
        "check": ("waymark.cli.check", "check",
                  "Compare the catalog, the files and the journal; --repair."),
        "guest": ("waymark.cli.guest", "guest", "The self-contained test and demo guest."),
        "job": ("waymark.cli.job", "job", "Long operations (merges, exports): list, wait, cancel."),
        "location": ("waymark.cli.location", "location",
                     "Named folders (repositories, export folders, libraries) for API users."),
        "profile": ("waymark.cli.library", "profile",
                    "Hardware profiles: settings new VMs and templates copy."),
        "library": ("waymark.cli.library", "library",
                    "Library shares: stored VMs and their checkpoints (vm store, vm deploy)."),
        "token": ("waymark.cli.users", "token", "API tokens for scripts: create, revoke, list."),
        "user": ("waymark.cli.users", "user",
                 "API users, roles and grants: add, passwd, remove, list, grant, revoke."),
        "serve": ("waymark.cli.serve", "serve",
                  "Serve the REST API and run the backup schedules."),
        "template": ("waymark.cli.library", "template",
                     "VM templates: a profile, boot files and read-only disk images."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.COMMANDS:
            return self.commands.get(cmd_name)
        module, attr, _ = self.COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)  # as click's own
        rows = [(name, self.COMMANDS[name][2] if name in self.COMMANDS
                 else self.commands[name].get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", metavar="DIR", envvar="WAYMARK_HOME",
              help="Waymark's data folder (default $XDG_DATA_HOME/waymark).")
@click.option("--server", metavar="URL", envvar="WAYMARK_SERVER",
              help="Act on this Waymark server's API instead of the local home.")
@click.option("--token", metavar="TOKEN", envvar="WAYMARK_TOKEN",
              help="The API token for --server (waymark token create).")
@click.option("-v", "--verbose", count=True, help="Log more (-vv: every command run).")
@click.version_option(__version__, prog_name="waymark")
@click.pass_context
def cli(click_ctx: click.Context, home: str | None, server: str | None, token: str | None,
        verbose: int) -> None:
    """Waymark: Hyper-V style checkpoints for QEMU/KVM virtual machines."""
    _log_to_stderr(verbose)
    failpoints.arm(os.environ)  # the test suite's only (see waymark.failpoints)
    click_ctx.obj = Face(home, server, token)
    click_ctx.call_on_close(click_ctx.obj.close)


LOG_HANDLER = "waymark-cli"


def _log_to_stderr(verbose: int) -> None:
    """By default only warnings show, in the CLI's own "warning: ..." form, on this invocation's
    stderr. The handler of an earlier invocation in the same process is replaced (the test
    suite runs commands in-process: :func:`run`)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == LOG_HANDLER]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(LOG_HANDLER)
    handler.setFormatter(logging.Formatter("warning: %(message)s" if verbose == 0
                                           else "%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))


def _report(err: WaymarkError, as_json: bool) -> None:
    if as_json:  # the API's error envelope (docs/api.md, "Errors")
        click.echo(json.dumps(envelope(err), indent=2))
    click.echo(f"error: {printable(err.message, lines=True)}", err=True)
    if err.hint:
        click.echo(printable(err.hint, lines=True), err=True)


def run(argv: list[str]) -> int:
    """Run one ``waymark`` command line; returns its exit code. The entry point's body, and
    what the test suite calls to run a command in-process where no process is killed."""
    try:
        cli.main(argv, prog_name="waymark", standalone_mode=False)
    except WaymarkError as err:
        _report(err, "--json" in argv)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("Cancelled; nothing changed.", err=True)
        return 1
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    return 0


def main() -> None:
    modes.restrict_process()  # before anything is created: see waymark.modes
    ended(run(sys.argv[1:]))


def ended(code: int) -> NoReturn:
    """End the process with ``code`` once the command is over, without Python's own teardown
    of every module and object (about 100 ms of CPU after a command that loaded the engine and
    the ORM; bench/run.py, ``create-depth``). Nothing is lost by skipping it: the command's
    context is closed (the catalog's connections too: :meth:`Face.close`, on click's close),
    every thread the interpreter would wait for is joined, the exit handlers run, and stdout
    and stderr are flushed; a flush that fails (a closed pipe) leaves the ending to Python,
    which reports it as before. A background job was handed to its own detached process
    (``jobs.spawn``), which this ending does not touch."""
    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging's flush among them
    atexit._clear()  # run once: a failed flush below still ends through Python
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)
