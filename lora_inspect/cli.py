"""The ``lora-inspect`` entry point: wires commands and turns known errors into one line.

Exit codes everywhere: 0 ok, 1 a ``check`` rule failed, 2 bad input or usage. ``--debug`` (or
``LORA_INSPECT_DEBUG=1``) shows the traceback instead of the one-line error.
"""

from __future__ import annotations

import os
import sys

import click

from . import __version__
from .errors import EXIT_BAD_INPUT, InspectError

__all__ = ["main"]


def _debug_enabled(ctx: click.Context | None) -> bool:
    if os.environ.get("LORA_INSPECT_DEBUG"):
        return True
    while ctx is not None:
        if ctx.obj and ctx.obj.get("debug"):
            return True
        ctx = ctx.parent
    return "--debug" in sys.argv[1:2]


def _fail(message: str) -> None:
    click.echo(f"lora-inspect: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


class _Group(click.Group):
    """A click group that imports commands when they are used and reports InspectError (and anything
    unexpected) as one line, exit 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from .commands import COMMANDS

        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from importlib import import_module

        from .commands import COMMANDS

        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InspectError as e:
            if _debug_enabled(ctx):
                raise
            _fail(str(e))
        except click.UsageError as e:  # a bad option value, a missing argument: one line too, not click's usage block
            if _debug_enabled(ctx):
                raise
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            _fail(f"{e.format_message()} (see '{where} --help')")
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("lora-inspect: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            if _debug_enabled(ctx):
                raise
            _fail("out of memory (is the input what it claims to be?)")
        except Exception as e:  # a bug or an input we did not foresee: still one line
            if _debug_enabled(ctx):
                raise
            _fail(f"unexpected {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} (run with --debug for details)")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="lora-inspect")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Tell the truth about trained LoRA adapters, and fix what it finds.

    \b
    Exit codes: 0 ok, 1 a `check` rule failed, 2 bad input or usage.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug

