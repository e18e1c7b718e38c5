"""The ``lora-inspect`` entry point: wires commands and turns known errors into one line.

Exit codes everywhere: 0 ok, 1 a rule or policy failed (``scan``: or an adapter unreadable), 2 bad input or usage. ``--debug`` (anywhere on
the command line, or ``LORA_INSPECT_DEBUG=1``) prints the traceback before that one line; the exit code
stays the same. Without it, Python warnings (numpy overflow, torch notices) are silenced: the tool's own
notes are the only text on stderr. A reader that closes the pipe early (``lora-inspect check … | head -1``)
does not change the exit code: the rest of the output is discarded and the command finishes.
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
import traceback
import warnings
from typing import Any, NoReturn

import click

# One BLAS thread per call, set before numpy loads (the user's own setting wins): modules are reduced in
# parallel by worker threads (spectrum.parallel_map), and a multi-threaded BLAS under them oversubscribes the
# cores (docs/internals.md, "Threads").
for _var in ("OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")

from . import __version__  # noqa: E402 - after the thread setting
from .errors import EXIT_BAD_INPUT, InspectError  # noqa: E402
from .optional import is_missing_torch, missing_torch  # noqa: E402

__all__ = ["main", "unknown_command", "HELP_WIDTH"]

DEBUG_FLAG = "--debug"
HELP_WIDTH = 80  # every --help fits 80 columns, however wide the terminal (and wraps to a narrower one)


def _debug_enabled(ctx: click.Context | None) -> bool:
    if os.environ.get("LORA_INSPECT_DEBUG"):
        return True
    while ctx is not None:
        if ctx.obj and ctx.obj.get("debug"):
            return True
        ctx = ctx.parent
    return False


def hoist_debug(args: list[str]) -> tuple[bool, list[str]]:
    """Move every ``--debug`` before the first ``--`` to the front, where the group option reads it.

    Returns (debug requested, the new argument list). ``--debug`` after ``--`` is an argument, kept as is.
    """
    end = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:end] if a != DEBUG_FLAG]
    found = len(head) != end
    return found, ([DEBUG_FLAG] if found else []) + head + args[end:]


def unknown_command(name: str, commands: list[str]) -> str:
    """``no command 'rnak'; did you mean 'rank'?`` (the nearest command by :func:`difflib.get_close_matches`),
    or a pointer to ``--help`` when none is near."""
    near = difflib.get_close_matches(name.lower(), commands, n=1)
    return f"no command {name!r}; " + (f"did you mean {near[0]!r}?" if near else "see 'lora-inspect --help'")


def _fail(message: str) -> NoReturn:
    click.echo(f"lora-inspect: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _fail_after_traceback(ctx: click.Context, message: str) -> NoReturn:
    if _debug_enabled(ctx):
        traceback.print_exc()
    _fail(message)


class _PipeSafeStdout:
    """sys.stdout that survives its reader going away: on the first EPIPE it points the file descriptor
    at /dev/null (so later writes and the flush at exit succeed) and drops everything after.

    This is the recipe of Python's signal documentation ("Note on SIGPIPE"), applied at write time so that
    the command runs to its end and exits with its own code instead of click's 1 for a broken pipe."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.broken = False

    def _silence(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real file (CliRunner's buffer): nothing to redirect
            pass

    def write(self, text: str) -> int:
        if self.broken:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            self._silence()
            return len(text)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            self._silence()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Group(click.Group):
    """A click group that imports commands when they are used and reports InspectError (and anything
    unexpected) as one line, exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug, argv = hoist_debug(argv)
        debug = debug or bool(os.environ.get("LORA_INSPECT_DEBUG"))
        real_stdout = sys.stdout
        sys.stdout = _PipeSafeStdout(real_stdout)
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore")
                return super().main(argv, prog_name or "lora-inspect", complete_var, standalone_mode, **extra)
        finally:
            try:
                sys.stdout.flush()
            finally:
                sys.stdout = real_stdout

    def list_commands(self, ctx: click.Context) -> list[str]:
        from .commands import COMMANDS

        return list(COMMANDS)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        """A command name that is not one is one line naming the nearest command, exit 2."""
        name = args[0] if args else ""
        if name and not name.startswith("-") and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            _fail(unknown_command(name, self.list_commands(ctx)))
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from importlib import import_module

        from .commands import COMMANDS

        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        command: click.Command = getattr(import_module(module), attr)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InspectError as e:
            _fail_after_traceback(ctx, str(e))
        except click.UsageError as e:  # a bad option value, a missing argument: one line too, not click's usage block
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            _fail_after_traceback(ctx, f"{e.format_message()} (see '{where} --help')")
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("lora-inspect: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            _fail_after_traceback(ctx, "out of memory (is the input what it claims to be?)")
        except Exception as e:  # a bug or an input we did not foresee: still one line
            if isinstance(e, ImportError) and is_missing_torch(e):  # torch absent, and a torch engine was asked for
                command = ["lora-inspect", *([ctx.invoked_subcommand] if ctx.invoked_subcommand else [])]
                _fail_after_traceback(ctx, missing_torch(" ".join(command)))
            first = str(e).splitlines()[0] if str(e) else ""
            hint = "" if _debug_enabled(ctx) else " (run with --debug for details)"
            _fail_after_traceback(ctx, f"unexpected {e.__class__.__name__}: {first}{hint}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": HELP_WIDTH})
@click.option("--debug", is_flag=True, help="Print the traceback before the one-line error (accepted anywhere).")
@click.version_option(__version__, prog_name="lora-inspect")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Tell the truth about trained LoRA adapters, and fix what it finds.

    \b
    Exit codes: 0 ok, 1 a rule or policy failed, 2 bad input or usage.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
