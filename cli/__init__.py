"""The ``oodfast`` command line (import name ``oodfast.cli``): thin click wrappers over the library.

Every error ends as one line on stderr, ``oodfast: error: ...``, naming the file, option or value and
saying what to do: exit status 2 for a bad command line, 1 for anything else (a missing or damaged
file, a full disk, a diverged run), 128 + N when signal N stopped a run after its checkpoint. An
exception oodfast does not expect ends the same way, with a pointer to ``--debug`` (or
``OODFAST_DEBUG=1``), which shows its traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import Any

import click

from oodfast import __version__
from oodfast.cli.bench import bench
from oodfast.cli.data import data
from oodfast.cli.evaluate import evaluate
from oodfast.cli.train import train

DEBUG_HINT = "run again with --debug (or OODFAST_DEBUG=1) for the traceback"

_OS_HINTS = {
    errno.ENOSPC: "free some space there or write elsewhere (e.g. another --output_dir)",
    errno.EDQUOT: "free some space there or write elsewhere (e.g. another --output_dir)",
    errno.EACCES: "choose a path you can write to, or fix its permissions",
    errno.EPERM: "choose a path you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a path on a writable one",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder: pass a file",
}


def _one_line(text: str, limit: int = 600) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_error(e: BaseException) -> str | None:
    """The one-line message of an error a user can meet (bad input, a damaged or missing file, a full
    or read-only disk, memory); None for an exception oodfast does not expect (a bug)."""
    if isinstance(e, OSError):
        if e.errno is None or not e.strerror:
            return _one_line(str(e) or type(e).__name__)
        if e.strerror != os.strerror(e.errno):  # oodfast's own wording (it names the file)
            return _one_line(e.strerror)
        target = " ".join(str(f) for f in (e.filename, e.filename2) if f)
        hint = _OS_HINTS.get(e.errno, "")
        return _one_line(f"{e.strerror.lower()}{': ' + target if target else ''}{'; ' + hint if hint else ''}")
    if isinstance(e, ValueError):
        return _one_line(str(e) or type(e).__name__)
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())
    if isinstance(e, MemoryError) or (oom and isinstance(e, oom)):
        first = _one_line(str(e), 200)
        return (f"out of memory{' (' + first + ')' if first else ''}; lower --batch_size_per_gpu, the crop sizes "
                "or --buffer-size, or use a device with more memory")
    return None


def _unexpected(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    detail = _one_line(str(e), 200)
    return (f"unexpected {type(e).__name__}{': ' + detail if detail else ''}{where} (a bug in oodfast, or a case it "
            f"does not handle: please report it); {DEBUG_HINT}")


class CommandError(click.ClickException):
    """A command's error as the one line ``oodfast: error: MESSAGE`` (status 1)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"oodfast: error: {_one_line(self.format_message())}", err=True)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


class OodfastGroup(click.Group):
    """``click.Group`` whose errors end as one line (see the module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # SystemExit / KeyboardInterrupt are not Exceptions: they pass
            if _debug(ctx):
                raise
            message = describe_error(e)
            raise CommandError(message if message is not None else _unexpected(e)) from e

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = " ".join(["oodfast", *e.ctx.command_path.split(" ")[1:]]) if e.ctx is not None else "oodfast"
            click.echo(f"oodfast: error: {_one_line(e.format_message())} (see '{where} --help')", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            CommandError(e.format_message()).show()
            sys.exit(e.exit_code)
        except click.Abort as e:
            click.echo("oodfast: aborted", err=True)
            sys.exit(130 if isinstance(e.__context__, KeyboardInterrupt) else 1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OodfastGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="oodfast")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, envvar="OODFAST_DEBUG",
              help="Show the Python traceback of an error (also: OODFAST_DEBUG=1).")
def main(verbose: int, debug: bool) -> None:
    """oodfast: fast OOD-enhanced DINO self-supervised pretraining."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


main.add_command(bench)
main.add_command(data)
main.add_command(evaluate)
main.add_command(train)
