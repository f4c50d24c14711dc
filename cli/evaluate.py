"""``oodfast evaluate {detect,represent,compare}`` (thin wrappers over oodfast.evaluate).

The encoder flags are those of facebookresearch/dino's ``eval_knn.py`` / ``eval_linear.py``, with
DINO's meanings: ``--pretrained_weights`` (also spelled ``--encoder``), ``--checkpoint_key``,
``--arch`` (DINO's ViTs or a torchvision ResNet) and ``--patch_size``; ``represent`` also takes
``--nb_knn K [K ...]`` and ``--temperature``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from oodfast.cli._options import DEVICE, FiniteFloatRange, check_report_paths, csv_of, report_options
from oodfast.cli.data import DATA_KINDS

#: DINO's ``eval_knn.py --nb_knn`` default.
DINO_NB_KNN = (10, 20, 100, 200)

_NUMBER = re.compile(r"-?\d+(\.\d*)?$")


class DinoCommand(click.Command):
    """A command whose ``variadic`` options take several values after one flag, as argparse's
    ``nargs='+'`` (``--nb_knn 10 20 100``): each is rewritten to the repeated form click parses
    (``--nb_knn 10 --nb_knn 20 ...``) of a ``multiple=True`` option. Values run up to the next
    token that starts with ``-`` and is not a number."""

    variadic: tuple[str, ...] = ("--nb_knn",)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        rest = list(args)
        while rest:
            token = rest.pop(0)
            if token == "--":
                out += [token, *rest]
                break
            name, eq, value = token.partition("=")
            if name not in self.variadic:
                out.append(token)
                continue
            values = [value] if eq else []
            while rest and (not rest[0].startswith("-") or _NUMBER.match(rest[0])):
                values.append(rest.pop(0))
            out += [item for v in values for item in (name, v)] if values else [name]  # none: click says so
        return super().parse_args(ctx, out)


def _arch(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from oodfast.encoders import backbone_names

    names = backbone_names()
    if value not in names:
        vits = [n for n in names if n.startswith("vit_")]
        raise click.BadParameter(f"{value!r} is not a backbone; choose DINO's {', '.join(vits)}, resnet50 (the "
                                 "paper's) or another torchvision ResNet (resnet18, resnext50_32x4d, ...)")
    return value


def _patch_size(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value not in (8, 16):
        raise click.BadParameter(f"{value} is not a patch size of DINO's ViTs; use 8 or 16")
    return value


def _source(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("is empty; pass a checkpoint or weights file, or 'random' for the untrained baseline")
    return value


def _data_options(fn):
    fn = click.option("--patch_size", type=int, default=None, callback=_patch_size,
                      help="Patch size of a ViT --arch, 8 or 16 (DINO's --patch_size) [default: 16].")(fn)
    fn = click.option("--checkpoint_key", default="teacher", show_default=True,
                      help="Network of a training checkpoint to evaluate: teacher or student (DINO's --checkpoint_key).")(fn)
    fn = click.option("--pretrained_weights", "--encoder", "encoder_source", default="random", show_default=True,
                      callback=_source,
                      help="An oodfast/DINO training checkpoint (its --checkpoint_key network), DINO/torchvision "
                           "backbone weights, or 'random' (DINO's --pretrained_weights; also spelled --encoder).")(fn)
    fn = click.option("--arch", default="resnet50", show_default=True, callback=_arch,
                      help="Backbone of --pretrained_weights: resnet50 (the paper's), another torchvision ResNet, or "
                           "DINO's vit_tiny / vit_small / vit_base (DINO's --arch; its eval scripts default to vit_small).")(fn)
    fn = click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Dataset folder.")(fn)
    fn = click.option("--data", "data", type=DATA_KINDS, default="synthetic", show_default=True,
                      help="A BDD10K-layout dataset (synthdrive or real BDD10K).")(fn)
    return click.option("--device", type=DEVICE, default=None, help="cpu, cuda or cuda:N [default: cuda when available].")(fn)


def _detectors(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    from oodfast.evaluate.detect import DETECTORS

    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise click.BadParameter(f"{value!r}: unknown detector(s) {', '.join(unknown) or '(none named)'}; "
                                 f"choose from {','.join(DETECTORS)}")
    return names


def _check_patches(arch: str, patch_size: int | None, **sizes: int) -> int:
    """The patch size to build ``arch`` with (16 unless given); UsageError for a --patch_size without a
    ViT or a crop size that is not a whole number of patches (``sizes``: flag -> pixels)."""
    from oodfast.encoders import is_vit

    if not is_vit(arch):
        if patch_size is not None:
            raise click.UsageError(f"--patch_size applies to ViTs (vit_tiny, vit_small, vit_base), not --arch {arch}; "
                                   "drop --patch_size or pass a ViT --arch")
        return 16
    patch = 16 if patch_size is None else patch_size
    for flag, size in sizes.items():
        if size % patch:
            lower, upper = max(patch, size // patch * patch), (size // patch + 1) * patch
            raise click.UsageError(f"{flag} {size} is not a multiple of --patch_size {patch} ({arch} cuts crops into "
                                   f"{patch}x{patch} patches); use e.g. {flag} {lower} or {upper}")
    return patch


def _encoder_record(source: str, arch: str, checkpoint_key: str, patch_size: int) -> dict[str, Any]:
    """What the report says about its encoder: the source and arch, plus the settings that applied to it."""
    from oodfast.encoders import is_vit

    record: dict[str, Any] = {"source": source, "arch": arch}
    if source != "random":
        record["checkpoint_key"] = checkpoint_key
    if is_vit(arch):
        record["patch_size"] = patch_size
    return record


def _setup(data: str, data_root: Path | None, encoder_source: str, arch: str, device: str | None,
           checkpoint_key: str, patch_size: int):
    from oodfast.data.discover import discover
    from oodfast.devices import resolve_device
    from oodfast.encoders import load_encoder

    device = resolve_device(device)  # None: the default device (cuda when torch sees a GPU)
    # first: a bad --pretrained_weights is named before data is built
    encoder = load_encoder(encoder_source, arch, device, checkpoint_key=checkpoint_key, patch_size=patch_size)
    kind = "bdd10k" if data == "synthetic" else data
    root = str(discover("synthetic", data_root, "train").root) if data == "synthetic" else data_root
    train = discover(kind, root, "train", require_masks=True)
    val = discover(kind, root, "val", require_masks=True)
    return encoder, train, val, device


@click.group()
def evaluate() -> None:
    """Detection quality against mask ground truth; representation quality of trained encoders."""


@evaluate.command()
@_data_options
@click.option("--detectors", callback=_detectors, default=None,
              help="Detectors, comma-separated: random, euclidean (the paper's), cosine, mahalanobis, knn, and the dense "
                   "dense-euclidean, dense-cosine, dense-mahalanobis, dense-knn [default: the five pooled ones].")
@click.option("--layer", type=click.Choice(["layer2", "layer3", "layer4", "tokens"]), default=None,
              help="Feature map of the dense-* detectors: a ResNet stage, or a ViT's patch tokens "
                   "[default: layer3, tokens for a ViT --arch].")
@click.option("--min-object-pixels", type=click.IntRange(min=1), default=None,
              help="Pixels of a rare object (at the crop's --crop-size) inside a crop for the object to count "
                   "for that crop in the per-object recall (16).")
@click.option("--bootstrap", type=click.IntRange(min=10), default=None,
              help="Resamples of the image-level bootstrap intervals (1000).")
@click.option("--calib-sizes", callback=csv_of(int, low=2), default=None, help="Calibration crop counts (paper: 256,1024).")
@click.option("--percentiles", callback=csv_of(float, low=0, high=1, low_open=True, high_open=True), default=None,
              help="Threshold percentiles (0.99,0.95,0.90,0.80).")
@click.option("--tau", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=None, help="Rare-pixel share that makes a crop rare (0.001).")
@click.option("--seeds", callback=csv_of(int, low=0), default=None, help="Crop seeds pooled (0,1,2).")
@click.option("--eval-images", type=click.IntRange(min=1), default=None, help="Val images to use [default: all].")
@click.option("--crop-size", type=click.IntRange(min=8), default=None, help="Global crop size (224).")
@click.option("--pr-png", "--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Precision-recall curves as a PNG (drawn with Pillow; also spelled --plot).")
@report_options
def detect(device, data, data_root, arch, encoder_source, checkpoint_key, patch_size, detectors, layer,
           min_object_pixels, bootstrap, calib_sizes, percentiles, tau, seeds, eval_images, crop_size, plot_path,
           json_path, markdown_path) -> None:
    """The paper's detection table on a BDD10K-layout dataset, every detector, with image-level intervals
    and per-object recall.

    Example (dense detectors on resnet50's layer3): oodfast evaluate detect --pretrained_weights
    dino_resnet50_pretrain.pth --detectors euclidean,dense-euclidean,dense-knn --layer layer3 --pr-png pr.png
    """
    from oodfast.encoders import is_vit
    from oodfast.evaluate.detect import DetectEvalConfig, detection_markdown, evaluate_detection, plot_pr
    from oodfast.report import write_report

    if layer is None:
        layer = "tokens" if is_vit(arch) else "layer3"
    elif (layer == "tokens") != is_vit(arch):
        fix = "--layer tokens" if is_vit(arch) else "--layer layer2, layer3 or layer4"
        raise click.UsageError(f"--layer {layer} does not fit --arch {arch} (a ResNet's maps are its stages, a ViT's "
                               f"its patch tokens); use {fix}")
    overrides = {k: v for k, v in dict(detectors=detectors, calib_sizes=calib_sizes, percentiles=percentiles, tau=tau,
                                       seeds=seeds, eval_images=eval_images, crop_size=crop_size, layer=layer,
                                       min_object_pixels=min_object_pixels, bootstrap=bootstrap).items()
                 if v is not None}
    config = DetectEvalConfig(**overrides)
    patch = _check_patches(arch, patch_size, **{"--crop-size": config.crop_size})
    check_report_paths(json_path, markdown_path, plot_path)
    encoder, train, val, device = _setup(data, data_root, encoder_source, arch, device, checkpoint_key, patch)
    report = evaluate_detection(encoder, train, val, config, device=device)
    report["encoder"] = _encoder_record(encoder_source, arch, checkpoint_key, patch)
    text = detection_markdown(report)
    write_report(report, text, json_path=json_path, markdown_path=markdown_path)
    if plot_path:
        plot_pr(report, plot_path)
    click.echo(text)


@evaluate.command(cls=DinoCommand)
@_data_options
@click.option("--nb_knn", type=click.IntRange(min=1), multiple=True, default=DINO_NB_KNN, show_default=True,
              metavar="K [K ...]",
              help="k of the weighted kNN, one or more: results for each (DINO's --nb_knn; 20 usually works best "
                   "and is the headline kNN when listed, otherwise the first).")
@click.option("--temperature", type=FiniteFloatRange(0.0, min_open=True), default=0.07, show_default=True,
              help="Temperature T of the kNN's vote weights exp(similarity / T) (DINO's --temperature).")
@click.option("--seeds", callback=csv_of(int, low=0), default="0,1,2", show_default=True, help="Linear-probe seeds.")
@click.option("--crops-per-image", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=8), default=224, show_default=True,
              help="Crop size fed to the encoder (a ViT: a multiple of --patch_size).")
@click.option("--tau", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=None,
              help="Rare-pixel share that makes a crop rare-present (0.001, as `evaluate detect`).")
@click.option("--batch_size_per_gpu", type=click.IntRange(min=1), default=None,
              help="Crops per encoder call (DINO's --batch_size_per_gpu) [default: 64].")
@click.option("--num_workers", type=click.IntRange(min=1), default=None,
              help="Image-decoding threads [default: the CPU count, at most 8].")
@report_options
def represent(device, data, data_root, arch, encoder_source, checkpoint_key, patch_size, nb_knn, temperature, seeds,
              crops_per_image, size, tau, batch_size_per_gpu, num_workers, json_path, markdown_path) -> None:
    """Frozen-feature kNN (DINO's eval_knn: each --nb_knn k, T=0.07) and linear probes on crop labels, by
    head/middle/tail band. Features: a ResNet's pooled output, a ViT's [CLS] embedding.

    Example (DINO's flags): oodfast evaluate represent --pretrained_weights OUTPUT_DIR/checkpoint.pth
    --checkpoint_key teacher --arch vit_small --patch_size 16 --nb_knn 10 20 100 200 --temperature 0.07
    """
    from oodfast.evaluate.represent import evaluate_representation, representation_markdown
    from oodfast.report import write_report

    patch = _check_patches(arch, patch_size, **{"--size": size})
    check_report_paths(json_path, markdown_path)
    encoder, train, val, device = _setup(data, data_root, encoder_source, arch, device, checkpoint_key, patch)
    extra = {k: v for k, v in dict(tau=tau, batch_size=batch_size_per_gpu, num_workers=num_workers).items()
             if v is not None}
    report = evaluate_representation(encoder, train, val, seeds=seeds, crops_per_image=crops_per_image, size=size,
                                     nb_knn=nb_knn, T=temperature, device=device, **extra)
    report["encoder"] = _encoder_record(encoder_source, arch, checkpoint_key, patch)
    name = f"{arch}/{patch}" if "patch_size" in report["encoder"] else arch
    text = representation_markdown(report, f"Representation quality: {encoder_source} ({name})")
    write_report(report, text, json_path=json_path, markdown_path=markdown_path)
    click.echo(text)


@evaluate.command()
@click.argument("arms", nargs=-1, required=True, metavar="LABEL=REPORT.json[,REPORT.json...] ...")
@report_options
def compare(arms, json_path, markdown_path) -> None:
    """One table of `evaluate represent` reports: an arm per LABEL, several reports = pretraining seeds.

    Example: oodfast evaluate compare none=runs/none/represent.json ood=runs/ood/represent.json
    """
    from oodfast.evaluate.compare import compare_representations, comparison_markdown, read_report
    from oodfast.report import write_report

    parsed: dict[str, list[dict]] = {}
    for arm in arms:
        label, sep, paths = arm.partition("=")
        if not sep or not label or not paths:
            raise click.BadParameter(f"{arm!r} is not LABEL=REPORT.json[,REPORT.json...]", param_hint="ARMS")
        try:
            reports = [read_report(path) for path in paths.split(",") if path]
        except ValueError as e:
            raise click.ClickException(f"arm {label}: {e}") from None
        if not reports:
            raise click.BadParameter(f"{arm!r} names no report: LABEL=REPORT.json[,REPORT.json...]", param_hint="ARMS")
        parsed.setdefault(label, []).extend(reports)
    comparison = compare_representations(parsed)
    text = comparison_markdown(comparison)
    write_report(comparison, text, json_path=json_path, markdown_path=markdown_path)
    click.echo(text)
