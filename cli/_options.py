"""Options shared by several commands."""

from __future__ import annotations

import math
from pathlib import Path

import click


def report_options(fn):
    """``--json PATH`` and ``--markdown PATH``: every command that produces a report takes both."""
    fn = click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
                      help="Write the report as markdown.")(fn)
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                        help="Write the report as JSON.")(fn)


def check_report_paths(*paths: Path | None) -> None:
    """Refuse report paths whose folder cannot be written, before a command spends its time."""
    from oodfast.train.checkpoint import check_writable_dir

    for flag, path in zip(("--json", "--markdown", "--plot"), paths):
        if path is not None:
            check_writable_dir(Path(path).expanduser().parent, f"the folder of {flag} {path}:")


def available_devices() -> list[str]:
    """The devices this machine can run on (:func:`oodfast.devices.available_devices`; torch is imported
    only when a command parses ``--device``)."""
    from oodfast.devices import available_devices as devices

    return devices()


class Device(click.ParamType):
    """``--device``: cpu, cuda or cuda:N, checked against this machine when parsed."""

    name = "device"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        valid = available_devices()
        if text in valid:
            return text
        if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
            from oodfast.devices import no_gpu_message

            why = no_gpu_message(value) if valid == ["cpu"] else f"{value!r}: this machine has {len(valid) - 2} GPU(s)"
            self.fail(f"{why}; valid devices here: {', '.join(valid)}", param, ctx)
        self.fail(f"{value!r} is not a device; valid devices here: {', '.join(valid)} "
                  "(cpu, cuda or cuda:N)", param, ctx)


DEVICE = Device()


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf (click's comparisons let nan through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def csv_of(cast: type, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False):
    """A click callback parsing ``a,b,c`` into a tuple of ``cast`` (int or float), each finite and in range."""
    def describe() -> str:
        if low is not None and high is not None:
            return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return f"{'>' if low_open else '>='} {low:g}" if low is not None else "finite"

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            items = tuple(cast(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of "
                                     f"{'integers' if cast is int else 'numbers'}") from None
        for v in items:
            bad = (not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low))
                   or (high is not None and (v >= high if high_open else v > high)))
            if bad:
                raise click.BadParameter(f"{v!r} in {value!r}: each value must be {describe()}")
        if not items:
            raise click.BadParameter(f"{value!r} names no value")
        return items
    return parse


class BoolFlag(click.ParamType):
    """facebookresearch/dino's ``utils.bool_flag``: ``true``/``false``, ``on``/``off``, ``1``/``0`` (any
    case). Options of this type also take no value (``--use_fp16`` alone means true)."""

    name = "true|false"
    TRUE, FALSE = ("on", "true", "1"), ("off", "false", "0")

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        self.fail(f"{value!r} is not a boolean: use true/false, on/off or 1/0", param, ctx)


BOOL_FLAG = BoolFlag()


def spellings(*flags: str) -> list[str]:
    """Each hyphenated ``--flag-name`` with its underscore spelling ``--flag_name`` after it (DINO's
    style), so both are accepted; ``--flag`` spellings without a hyphen stay as they are."""
    out: list[str] = []
    for flag in flags:
        out.append(flag)
        if flag.startswith("--") and "-" in flag[2:]:
            out.append("--" + flag[2:].replace("-", "_"))
    return out


class SpellingCommand(click.Command):
    """A command that remembers its raw arguments (``ctx.meta["argv"]``), so an error can name an option
    by the spelling the user typed (:func:`typed_flag`). Options named in ``pair_options`` take one or
    two integers (``--global_size 224`` or ``--global_size 512 1024``; click's options take a fixed
    number): a second integer is joined to the first as ``512,1024`` before click parses them, which
    is unambiguous for a command without positional arguments."""

    pair_options: tuple[str, ...] = ()

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, join_pairs(list(args), self.pair_options))


def join_pairs(args: list[str], options: tuple[str, ...]) -> list[str]:
    """``args`` with ``OPT A B`` (and ``OPT=A B``) read as ``OPT A,B`` for each option of ``options``
    followed by two integers; everything after ``--`` is left as it is."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return out + args[i:]
        opt, eq, value = token.partition("=")
        if opt in options and eq and i + 1 < len(args) and value.isdigit() and args[i + 1].isdigit():
            out.append(f"{token},{args[i + 1]}")
            i += 2
        elif opt in options and not eq and i + 2 < len(args) and args[i + 1].isdigit() and args[i + 2].isdigit():
            out += [token, f"{args[i + 1]},{args[i + 2]}"]
            i += 3
        else:
            out.append(token)
            i += 1
    return out


class CropSize(click.ParamType):
    """A crop size in pixels: ``H`` (a square) or ``H W`` (height, width; joined to ``H,W`` by
    :func:`join_pairs`). Converts to an int or an (h, w) tuple; the range is checked by the caller."""

    name = "H [W]"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)):
            return value
        try:
            sizes = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            sizes = ()
        if len(sizes) not in (1, 2):
            self.fail(f"{value!r} is not a crop size: give H (a square) or H W (height, width) in pixels, "
                      "e.g. 224 or 512 1024", param, ctx)
        return sizes[0] if len(sizes) == 1 else sizes


CROP_SIZE = CropSize()


def typed_flag(ctx: click.Context | None, opts: list[str]) -> str:
    """The spelling among ``opts`` (one option's names) that the command line used, else the first."""
    argv = ctx.meta.get("argv", []) if ctx is not None else []
    for token in argv:
        for opt in opts:
            if token == opt or token.startswith(opt + "="):
                return opt
    return opts[0]
