"""``oodfast train``: DINO with the OOD replay buffer (thin wrapper over oodfast.train.Trainer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from oodfast.cli._options import DEVICE, check_report_paths, report_options
from oodfast.cli.data import DATA_KINDS, parse_size
from oodfast.train.config import ConfigError, check_field


# (option name, python name, type, help). Defaults come from the preset; an option given overrides it.
DINO_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--arch", "arch", str, "torchvision backbone (paper: resnet50)."),
    ("--out_dim", "out_dim", int, "DINO head output size (65536; smaller for small data or CPU runs)."),
    ("--batch_size_per_gpu", "batch_size_per_gpu", int, "Images per process and step, before the buffer's C rows."),
    ("--epochs", "epochs", int, "Training epochs (paper: 100)."),
    ("--lr", "lr", float, "Peak learning rate at batch 256 (scaled linearly by the global batch; paper 5e-4)."),
    ("--min_lr", "min_lr", float, "Final learning rate of the cosine."),
    ("--warmup_epochs", "warmup_epochs", int, "Linear learning-rate warm-up epochs (10)."),
    ("--weight_decay", "weight_decay", float, "Initial weight decay (0.04)."),
    ("--weight_decay_end", "weight_decay_end", float, "Final weight decay (0.4)."),
    ("--momentum_teacher", "momentum_teacher", float, "Teacher EMA momentum, cosine to 1 (0.996; 0.9995 for small batches)."),
    ("--teacher_temp", "teacher_temp", float, "Teacher temperature after warm-up (0.04; raise towards 0.07 if training is unstable)."),
    ("--warmup_teacher_temp", "warmup_teacher_temp", float, "Initial teacher temperature."),
    ("--warmup_teacher_temp_epochs", "warmup_teacher_temp_epochs", int, "Teacher temperature warm-up epochs."),
    ("--clip_grad", "clip_grad", float, "Per-parameter gradient norm clip (3.0; 0 disables)."),
    ("--freeze_last_layer", "freeze_last_layer", int, "Epochs during which the head's last layer is frozen (1)."),
    ("--local_crops_number", "local_crops_number", int, "Local crops per image (paper: 6)."),
    ("--output_dir", "output_dir", str, "Where checkpoints and log.jsonl go."),
    ("--saveckp_freq", "saveckp_freq", int, "Also keep checkpointNNNN.pth every N epochs."),
    ("--seed", "seed", int, "Seed of every random choice (data order, crops, init)."),
    ("--buffer-size", "buffer_size", int, "Images in the rare buffer, C (paper: 32)."),
    ("--calib-size", "calib_size", int, "Calibration images for the detector statistics (paper: 256 or 1024)."),
    ("--calib-frac", "calib_frac", float, "Calibrate on this fraction of the data instead (e.g. 0.05)."),
    ("--ood-percentile", "ood_percentile", float, "Threshold percentile of calibration scores (0.80-0.99; 0.95)."),
    ("--global-size", "global_size", int, "Global crop size in pixels (224)."),
    ("--local-size", "local_size", int, "Local crop size in pixels (96)."),
    ("--epoch-length", "epoch_length", int, "Images per epoch (default: the dataset)."),
    ("--max-steps", "max_steps", int, "Stop after this many steps (smoke tests)."),
]


#: TrainConfig field -> the option that sets it, so a config error names what the user typed.
FLAGS: dict[str, str] = {name: flag for flag, name, _, _ in DINO_OPTIONS} | {
    "aug": "--aug", "detector": "--detector", "detector_weights": "--detector-weights", "metric": "--metric",
    "threshold_mode": "--threshold", "replay": "--replay", "data": "--data", "data_root": "--data-root",
}


def _in_range(name: str):
    """Parse-time check of one option against TrainConfig's limits (oodfast.train.config.FIELD_RANGES)."""
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is not None:
            try:
                check_field(name, value)
            except ConfigError as e:
                raise click.UsageError(e.render(FLAGS), ctx) from None
        return value
    return callback


def _dino_options(fn):
    for flag, name, typ, help_text in reversed(DINO_OPTIONS):
        fn = click.option(flag, name, type=typ, default=None, help=help_text, callback=_in_range(name))(fn)
    return fn


@click.command()
@click.option("--data", "data", type=DATA_KINDS, default="synthetic", show_default=True,
              help="Dataset layout; synthetic (synthdrive) is generated on first use.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Dataset folder.")
@click.option("--synthetic-images", type=click.IntRange(min=8), default=None,
              help="--data synthetic: frames to generate (default 2400).")
@click.option("--synthetic-size", default=None, callback=lambda c, p, v: parse_size(c, p, v) if v else None,
              help="--data synthetic: frame size WxH (default 640x360).")
@click.option("--preset", type=click.Choice(["auto", "paper", "cpu"]), default="auto", show_default=True,
              help="auto: the paper's recipe on a GPU, a small resnet18 run on a CPU.")
@click.option("--aug", type=click.Choice(["dali", "paper", "torch", "reference"]), default=None,
              help="Multi-crop backend: DALI (default), the paper's PIL path (also spelled reference), "
                   "or torchvision on the device.")
@click.option("--detector", type=click.Choice(["teacher", "frozen"]), default=None,
              help="teacher: reuse the teacher's embedding of the global crops (no extra forward); "
                   "frozen: a separate frozen ResNet-50 from --detector-weights (the paper).")
@click.option("--detector-weights", type=click.Path(dir_okay=False), default=None,
              help="ResNet-50 state dict (e.g. dino_resnet50_pretrain.pth) or a DINO checkpoint, for --detector frozen.")
@click.option("--metric", type=click.Choice(["euclidean", "cosine", "mahalanobis", "knn"]), default=None,
              help="Rarity score (paper: euclidean distance to the mean).")
@click.option("--threshold", "threshold_mode", type=click.Choice(["fixed", "online"]), default=None,
              help="online: adapt the threshold on the device to hold the calibrated flag rate.")
@click.option("--no-ood", is_flag=True, help="Plain DINO: no buffer (ablation).")
@click.option("--replay", type=click.Choice(["ood", "random", "oracle"]), default=None,
              help="random: a buffer of randomly chosen images (replay without detection); oracle: images that "
                   "truly hold rare objects, from the masks (the upper bound; needs BDD10K-layout masks).")
@click.option("--no-compile", is_flag=True, help="Run the step eagerly (no torch.compile).")
@click.option("--tensorboard", is_flag=True, help="Also log the scalars to TensorBoard (output_dir/tb; extra 'tensorboard').")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Checkpoint to continue from.")
@click.option("--device", type=DEVICE, default=None, help="cpu, cuda or cuda:N [default: cuda when available].")
@report_options
@_dino_options
def train(data: str, data_root: Path | None, synthetic_images: int | None, synthetic_size: tuple[int, int] | None,
          preset: str, aug: str | None, detector: str | None,
          detector_weights: str | None, metric: str | None, threshold_mode: str | None, no_ood: bool, replay: str | None,
          no_compile: bool, tensorboard: bool, resume: str | None, device: str | None, json_path: Path | None,
          markdown_path: Path | None, **dino: Any) -> None:
    """Train DINO with the OOD replay buffer (default: on synthdrive, anywhere)."""
    from oodfast.devices import default_device
    from oodfast.report import markdown_table, write_report
    from oodfast.train.checkpoint import check_checkpoint_file, check_writable_dir
    from oodfast.train.config import PRESETS, preset_for
    from oodfast.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

    device = device or default_device()
    name = preset_for(device) if preset == "auto" else preset
    overrides = {k: v for k, v in dino.items() if v is not None}
    overrides.update({k: v for k, v in dict(aug=aug, detector=detector, detector_weights=detector_weights,
                                             metric=metric, threshold_mode=threshold_mode).items() if v is not None})
    overrides.update(data=data, data_root=str(data_root) if data_root else None)
    spec = {}
    if synthetic_images:
        spec["num_images"] = synthetic_images
    if synthetic_size:
        spec["width"], spec["height"] = synthetic_size
    if spec:
        if data != "synthetic":
            raise click.UsageError("--synthetic-images / --synthetic-size apply to --data synthetic only")
        overrides["synthetic_spec"] = spec
    if no_ood and replay:
        raise click.UsageError("--no-ood and --replay exclude each other")
    if no_ood:
        overrides["replay"] = "none"
    elif replay:
        overrides["replay"] = replay
    if no_compile:
        overrides["compile"] = False
    if tensorboard:
        overrides["tensorboard"] = True
    try:
        config = PRESETS[name](**overrides)
    except ConfigError as e:  # a combination of options (or an option against the preset), e.g. --epochs 5 < warm-up
        raise click.UsageError(e.render(FLAGS) + f" (preset {name})", click.get_current_context()) from None
    check_writable_dir(config.output_dir, "--output_dir")  # before any work: a run that cannot be saved is refused
    check_report_paths(json_path, markdown_path)
    if resume is not None:  # an empty or cut-off file is refused now, not after the data is built
        check_checkpoint_file(resume, "--resume")
    elif (Path(config.output_dir) / "checkpoint.pth").exists():  # the run the trainer continues
        check_checkpoint_file(Path(config.output_dir) / "checkpoint.pth", "--output_dir's run")
    if config.replay == "ood" and config.detector == "frozen" and config.detector_weights:
        check_checkpoint_file(config.detector_weights, "--detector-weights")
    try:
        summary = Trainer(config, device=device, resume=resume).train()
    except TrainingDiverged as e:
        raise click.ClickException(str(e)) from None
    except TrainingInterrupted as e:  # the checkpoint holds the last step: exit as the signal would have
        click.echo(f"oodfast train: {e}", err=True)
        sys.exit(128 + e.signum)
    summary = {"preset": name, "device": device, **summary}
    text = "# oodfast train\n\n" + markdown_table(["key", "value"], [(k, json.dumps(v) if isinstance(v, dict) else v)
                                                                   for k, v in summary.items()])
    write_report(summary, text, json_path=json_path, markdown_path=markdown_path)
    click.echo(text)
