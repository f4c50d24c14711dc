"""``oodfast evaluate {detect,represent,compare}`` (thin wrappers over oodfast.evaluate)."""

from __future__ import annotations

from pathlib import Path

import click

from oodfast.cli._options import DEVICE, FiniteFloatRange, check_report_paths, csv_of, report_options
from oodfast.cli.data import DATA_KINDS


def _data_options(fn):
    fn = click.option("--encoder", "encoder_source", default="random", show_default=True,
                      help="DINO/torchvision weights, an oodfast/DINO checkpoint (its teacher), or 'random'.")(fn)
    fn = click.option("--arch", default="resnet50", show_default=True, help="Backbone of --encoder.")(fn)
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


def _setup(data: str, data_root: Path | None, encoder_source: str, arch: str, device: str | None):
    from oodfast.data.discover import discover
    from oodfast.devices import resolve_device
    from oodfast.encoders import load_encoder

    device = resolve_device(device)  # None: the default device (cuda when torch sees a GPU)
    encoder = load_encoder(encoder_source, arch, device)  # first: a bad --encoder is named before data is built
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
@click.option("--detectors", callback=_detectors, default=None, help="Subset of random,euclidean,cosine,mahalanobis,knn.")
@click.option("--calib-sizes", callback=csv_of(int, low=2), default=None, help="Calibration crop counts (paper: 256,1024).")
@click.option("--percentiles", callback=csv_of(float, low=0, high=1, low_open=True, high_open=True), default=None,
              help="Threshold percentiles (0.99,0.95,0.90,0.80).")
@click.option("--tau", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=None, help="Rare-pixel share that makes a crop rare (0.001).")
@click.option("--seeds", callback=csv_of(int, low=0), default=None, help="Crop seeds pooled (0,1,2).")
@click.option("--eval-images", type=click.IntRange(min=1), default=None, help="Val images to use [default: all].")
@click.option("--crop-size", type=click.IntRange(min=8), default=None, help="Global crop size (224).")
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
    if plot_path:
        require_matplotlib()
    config = DetectEvalConfig(**overrides)
    check_report_paths(json_path, markdown_path, plot_path)
    encoder, train, val, device = _setup(data, data_root, encoder_source, arch, device)
    report = evaluate_detection(encoder, train, val, config, device=device)
    report["encoder"] = {"source": encoder_source, "arch": arch}
    text = detection_markdown(report)
    write_report(report, text, json_path=json_path, markdown_path=markdown_path)
    if plot_path:
        plot_pr(report, plot_path)
    click.echo(text)


@evaluate.command()
@_data_options
@click.option("--seeds", callback=csv_of(int, low=0), default="0,1,2", show_default=True, help="Linear-probe seeds.")
@click.option("--crops-per-image", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=8), default=224, show_default=True, help="Crop size fed to the encoder.")
@click.option("--tau", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=None,
              help="Rare-pixel share that makes a crop rare-present (0.001, as `evaluate detect`).")
@report_options
def represent(device, data, data_root, arch, encoder_source, seeds, crops_per_image, size, tau, json_path,
              markdown_path) -> None:
    """Frozen-feature kNN (k=20, T=0.07) and linear probes on crop labels, by head/middle/tail band."""
    from oodfast.evaluate.represent import evaluate_representation, representation_markdown
    from oodfast.report import write_report

    check_report_paths(json_path, markdown_path)
    encoder, train, val, device = _setup(data, data_root, encoder_source, arch, device)
    extra = {} if tau is None else {"tau": tau}
    report = evaluate_representation(encoder, train, val, seeds=seeds, crops_per_image=crops_per_image,
                                     size=size, device=device, **extra)
    report["encoder"] = {"source": encoder_source, "arch": arch}
    text = representation_markdown(report, f"Representation quality: {encoder_source} ({arch})")
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
