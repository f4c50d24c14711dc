"""``oodfast evaluate {detect,represent,compare}`` (thin wrappers over oodfast.evaluate)."""

from __future__ import annotations

from pathlib import Path

import click

from oodfast.cli._options import report_options
from oodfast.cli.data import DATA_KINDS


def _csv(cast):
    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list") from None
    return parse


def _data_options(fn):
    fn = click.option("--encoder", "encoder_source", default="random", show_default=True,
                      help="DINO/torchvision weights, an oodfast/DINO checkpoint (its teacher), or 'random'.")(fn)
    fn = click.option("--arch", default="resnet50", show_default=True, help="Backbone of --encoder.")(fn)
    fn = click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Dataset folder.")(fn)
    fn = click.option("--data", "data", type=DATA_KINDS, default="synthetic", show_default=True,
                      help="A BDD10K-layout dataset (synthdrive or real BDD10K).")(fn)
    return click.option("--device", default=None, help="cuda or cpu [default: cuda when available].")(fn)


def _setup(data: str, data_root: Path | None, encoder_source: str, arch: str, device: str | None):
    import torch

    from oodfast.data.discover import discover
    from oodfast.evaluate.represent import load_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = "bdd10k" if data == "synthetic" else data
    root = str(discover("synthetic", data_root, "train").root) if data == "synthetic" else data_root
    train = discover(kind, root, "train", require_masks=True)
    val = discover(kind, root, "val", require_masks=True)
    return load_encoder(encoder_source, arch, device), train, val, device


@click.group()
def evaluate() -> None:
    """Detection quality against mask ground truth; representation quality of trained encoders."""


@evaluate.command()
@_data_options
@click.option("--detectors", callback=_csv(str), default=None, help="Subset of random,euclidean,cosine,mahalanobis,knn.")
@click.option("--calib-sizes", callback=_csv(int), default=None, help="Calibration crop counts (paper: 256,1024).")
@click.option("--percentiles", callback=_csv(float), default=None, help="Threshold percentiles (0.99,0.95,0.90,0.80).")
@click.option("--tau", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, help="Rare-pixel share that makes a crop rare (0.001).")
@click.option("--seeds", callback=_csv(int), default=None, help="Crop seeds pooled (0,1,2).")
@click.option("--eval-images", type=int, default=None, help="Val images to use [default: all].")
@click.option("--crop-size", type=int, default=None, help="Global crop size (224).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Precision-recall plot (PNG; needs matplotlib).")
@report_options
def detect(device, data, data_root, arch, encoder_source, detectors, calib_sizes, percentiles, tau, seeds,
           eval_images, crop_size, plot_path, json_path, markdown_path) -> None:
    """The paper's detection table on a BDD10K-layout dataset, every detector, with intervals."""
    from oodfast.bench import require_matplotlib
    from oodfast.evaluate.detect import DetectEvalConfig, detection_markdown, evaluate_detection, plot_pr
    from oodfast.report import write_report

    overrides = {k: v for k, v in dict(detectors=detectors, calib_sizes=calib_sizes, percentiles=percentiles, tau=tau,
                                       seeds=seeds, eval_images=eval_images, crop_size=crop_size).items() if v is not None}
    try:
        if plot_path:
            require_matplotlib()
        config = DetectEvalConfig(**overrides)
        encoder, train, val, device = _setup(data, data_root, encoder_source, arch, device)
        report = evaluate_detection(encoder, train, val, config, device=device)
        report["encoder"] = {"source": encoder_source, "arch": arch}
        text = detection_markdown(report)
        write_report(report, text, json_path=json_path, markdown_path=markdown_path)
        if plot_path:
            plot_pr(report, plot_path)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)


@evaluate.command()
@_data_options
@click.option("--seeds", callback=_csv(int), default="0,1,2", show_default=True, help="Linear-probe seeds.")
@click.option("--crops-per-image", type=int, default=8, show_default=True)
@click.option("--size", type=int, default=224, show_default=True, help="Crop size fed to the encoder.")
@click.option("--tau", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Rare-pixel share that makes a crop rare-present (0.001, as `evaluate detect`).")
@report_options
def represent(device, data, data_root, arch, encoder_source, seeds, crops_per_image, size, tau, json_path,
              markdown_path) -> None:
    """Frozen-feature kNN (k=20, T=0.07) and linear probes on crop labels, by head/middle/tail band."""
    from oodfast.evaluate.represent import evaluate_representation, representation_markdown
    from oodfast.report import write_report

    try:
        encoder, train, val, device = _setup(data, data_root, encoder_source, arch, device)
        extra = {} if tau is None else {"tau": tau}
        report = evaluate_representation(encoder, train, val, seeds=seeds, crops_per_image=crops_per_image,
                                         size=size, device=device, **extra)
        report["encoder"] = {"source": encoder_source, "arch": arch}
        text = representation_markdown(report, f"Representation quality: {encoder_source} ({arch})")
        write_report(report, text, json_path=json_path, markdown_path=markdown_path)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)


@evaluate.command()
@click.argument("arms", nargs=-1, required=True, metavar="LABEL=REPORT.json[,REPORT.json...] ...")
@report_options
def compare(arms, json_path, markdown_path) -> None:
    """One table of `evaluate represent` reports: an arm per LABEL, several reports = pretraining seeds.

    Example: oodfast evaluate compare none=runs/none/represent.json ood=runs/ood/represent.json
    """
    import json

    from oodfast.evaluate.compare import compare_representations, comparison_markdown
    from oodfast.report import write_report

    parsed: dict[str, list[dict]] = {}
    for arm in arms:
        label, sep, paths = arm.partition("=")
        if not sep or not label or not paths:
            raise click.BadParameter(f"{arm!r} is not LABEL=REPORT.json[,REPORT.json...]", param_hint="ARMS")
        reports = []
        for path in (p for p in paths.split(",") if p):
            try:
                with open(path, encoding="utf-8") as f:
                    report = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise click.ClickException(f"arm {label}: cannot read report {path}: {e}") from None
            if not (isinstance(report, dict) and isinstance(report.get("dominant"), dict)
                    and isinstance(report.get("rare_present"), dict)):
                raise click.ClickException(f"arm {label}: {path} is not an `oodfast evaluate represent` JSON report "
                                           "(no 'dominant'/'rare_present' sections)")
            reports.append(report)
        if not reports:
            raise click.BadParameter(f"{arm!r} names no report: LABEL=REPORT.json[,REPORT.json...]", param_hint="ARMS")
        parsed.setdefault(label, []).extend(reports)
    try:
        comparison = compare_representations(parsed)
        text = comparison_markdown(comparison)
        write_report(comparison, text, json_path=json_path, markdown_path=markdown_path)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)
