"""``oodfast data {synth,check}``: thin wrappers over oodfast.data."""

from __future__ import annotations

import math
from pathlib import Path

import click

from oodfast.cli._options import FiniteFloatRange, check_report_paths, report_options
from oodfast.data.discover import KINDS

DATA_KINDS = click.Choice(list(KINDS))


def parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, int]:
    """``WxH`` -> (W, H)."""
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 64 or h < 64:
        raise click.BadParameter(f"{value!r}: frames must be at least 64x64")
    return w, h


def parse_weights(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dict[str, float] | None:
    """``person=0.3,train=0.05`` -> {"person": 0.3, "train": 0.05}."""
    if not value:
        return None
    out: dict[str, float] = {}
    for item in value.split(","):
        name, sep, weight = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not CLASS=WEIGHT, e.g. person=0.3") from None
        if not (math.isfinite(out[name.strip()]) and out[name.strip()] >= 0):
            raise click.BadParameter(f"{item!r}: a weight must be a finite number >= 0")
    return out


@click.group()
def data() -> None:
    """Generate the synthdrive dataset and check datasets before training."""


@data.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset root to create (BDD10K layout: images/10k/..., labels/sem_seg/masks/...).")
@click.option("--num-images", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Frames in total, train and val together.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Frame i of a seed is the same image whatever --num-images and --workers are.")
@click.option("--size", "size", default="1280x720", show_default=True, callback=parse_size,
              help="Frame size WxH (BDD: 1280x720; 640x360 is 4x faster to make and to load).")
@click.option("--val-fraction", type=FiniteFloatRange(0, 1, max_open=True), default=0.125, show_default=True,
              help="Share of frames in the val split (BDD10K: 1000 of 8000).")
@click.option("--rare-prob", type=FiniteFloatRange(0, 1), default=None,
              help="Probability that a frame holds a rare object (default 0.25: ~15% of global crops rare).")
@click.option("--rare-weights", callback=parse_weights, default=None,
              help="Relative frequencies of rare classes, e.g. 'person=0.3,train=0.05' (others keep defaults).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Drawing processes [default: all cores].")
@click.option("--overwrite", is_flag=True, help="Replace an existing synthdrive dataset at --out.")
@report_options
def synth(out: Path, num_images: int, seed: int, size: tuple[int, int], val_fraction: float,
          rare_prob: float | None, rare_weights: dict[str, float] | None, workers: int | None,
          overwrite: bool, json_path: Path | None, markdown_path: Path | None) -> None:
    """Draw the synthdrive street-scene dataset with BDD10K-format masks."""
    from oodfast.data.synthdrive import SynthConfig, generate, manifest_markdown
    from oodfast.report import write_report

    defaults = SynthConfig()
    config = SynthConfig(
        width=size[0], height=size[1],
        rare_image_prob=defaults.rare_image_prob if rare_prob is None else rare_prob,
        rare_weights={**defaults.rare_weights, **(rare_weights or {})},
    )
    check_report_paths(json_path, markdown_path)
    manifest = generate(out, num_images, seed, config, val_fraction=val_fraction, workers=workers,
                        progress=True, overwrite=overwrite)
    text = manifest_markdown(manifest)
    write_report(manifest, text, json_path=json_path, markdown_path=markdown_path)
    click.echo(text)
    click.echo(f"wrote {out}")


@data.command()
@click.option("--data", "kind", type=DATA_KINDS, required=True, help="Dataset layout.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Dataset folder (for synthetic: where it is generated; default the oodfast cache).")
@click.option("--split", default="train", show_default=True, help="train, val or test (ignored for folder).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the clean file list [default: the oodfast cache, where training finds it].")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Decoding processes [default: all cores].")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any file is bad.")
@report_options
def check(kind: str, data_root: Path | None, split: str, out: Path | None, workers: int | None, strict: bool,
          json_path: Path | None, markdown_path: Path | None) -> None:
    """Decode every image (and mask) once; report bad files and write the clean file list.

    DALI cannot skip a corrupt JPEG mid-epoch, so training reads only the files this check passed.
    Dataset files are never modified.
    """
    from oodfast.data.check import check_dataset, report_markdown
    from oodfast.data.discover import discover
    from oodfast.report import write_report

    check_report_paths(json_path, markdown_path)
    files = discover(kind, data_root, split, use_default_list=False)
    report = check_dataset(files, workers=workers, out=out, progress=True)
    text = report_markdown(report)
    write_report(report.to_dict(), text, json_path=json_path, markdown_path=markdown_path)
    click.echo(text)
    if strict and report.bad:
        raise SystemExit(1)
