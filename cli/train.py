"""``oodfast train``: DINO with the OOD replay buffer (thin wrapper over oodfast.train.Trainer).

Every training argument of facebookresearch/dino's ``main_dino.py`` is accepted, in DINO's underscore
spelling and with DINO's meaning (docs/dino.md has the table); oodfast's own hyphenated options also
take underscores (``--data-root`` / ``--data_root``). ``--data_path DIR`` is ``--data folder --data-root
DIR``. An error names the option in the spelling typed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from oodfast.cli._options import (BOOL_FLAG, CROP_SIZE, DEVICE, SpellingCommand, check_report_paths, report_options,
                                  spellings, typed_flag)
from oodfast.cli.data import DATA_KINDS, parse_size
from oodfast.train.config import CROP_RECIPES, DENSE_LAYERS, OPTIMIZERS, ConfigError, check_field

# (option names, TrainConfig field, type, help). Defaults come from the preset; an option given overrides it.
DINO_OPTIONS: list[tuple[tuple[str, ...], str, Any, str]] = [
    (("--arch",), "arch", str, "resnet50 (the paper's), another torchvision ResNet-family name, or DINO's ViTs "
                               "vit_tiny | vit_small | vit_base (deit_tiny / deit_small as in DINO)."),
    (("--patch_size",), "patch_size", int, "ViT patch size, 8 or 16 (16). Crop sizes must be multiples of it."),
    (("--drop_path_rate",), "drop_path_rate", float, "ViT stochastic depth rate of the student (0.1; the teacher "
                                                     "has none)."),
    (("--out_dim",), "out_dim", int, "DINO head output size (65536; smaller for small data or CPU runs)."),
    (("--norm_last_layer",), "norm_last_layer", BOOL_FLAG, "Weight-normalise the head's last layer with a fixed "
                                                           "norm (true; false can train better but less stably)."),
    (("--use_bn_in_head",), "use_bn_in_head", BOOL_FLAG, "BatchNorm in the projection head (false)."),
    (("--use_fp16",), "bf16", BOOL_FLAG, "Mixed precision on a GPU: bf16 autocast where supported, else fp16 with a "
                                         "loss scaler (V100, T4); false: fp32. The CPU always runs fp32."),
    (("--optimizer",), "optimizer", click.Choice(OPTIMIZERS), "adamw (ViTs, the paper), sgd (momentum 0.9) or lars "
                                                             "(convnets, large batches)."),
    (("--batch_size_per_gpu",), "batch_size_per_gpu", int, "Images per process and step, before the buffer's C rows."),
    (("--epochs",), "epochs", int, "Training epochs (paper: 100)."),
    (("--lr",), "lr", float, "Peak learning rate at batch 256 (scaled linearly by the global batch; paper 5e-4)."),
    (("--min_lr",), "min_lr", float, "Final learning rate of the cosine."),
    (("--warmup_epochs",), "warmup_epochs", int, "Linear learning-rate warm-up epochs (10)."),
    (("--weight_decay",), "weight_decay", float, "Initial weight decay (0.04)."),
    (("--weight_decay_end",), "weight_decay_end", float, "Final weight decay (0.4)."),
    (("--momentum_teacher",), "momentum_teacher", float, "Teacher EMA momentum, cosine to 1 (0.996; 0.9995 for "
                                                         "small batches)."),
    (("--teacher_temp",), "teacher_temp", float, "Teacher temperature after warm-up (0.04; raise towards 0.07 if "
                                                 "training is unstable)."),
    (("--warmup_teacher_temp",), "warmup_teacher_temp", float, "Initial teacher temperature."),
    (("--warmup_teacher_temp_epochs",), "warmup_teacher_temp_epochs", int, "Teacher temperature warm-up epochs."),
    (("--clip_grad",), "clip_grad", float, "Per-parameter gradient norm clip (3.0; 0 disables)."),
    (("--freeze_last_layer",), "freeze_last_layer", int, "Epochs during which the head's last layer is frozen (1)."),
    (("--local_crops_number",), "local_crops_number", int, "Local crops per image (paper: 6)."),
    (("--output_dir",), "output_dir", str, "Where checkpoints and log.jsonl go."),
    (("--saveckp_freq",), "saveckp_freq", int, "Also keep checkpointNNNN.pth every N epochs."),
    (("--seed",), "seed", int, "Seed of every random choice (data order, crops, init)."),
    (("--num_workers",), "num_workers", int, "Data loading workers per process (default: the loader's choice)."),
    (("--pretrained_weights",), "pretrained_weights", click.Path(dir_okay=False),
     "Start student and teacher from these weights (a DINO/oodfast checkpoint or a backbone state dict; not a "
     "resume: no optimizer or step state)."),
    (("--checkpoint_key",), "checkpoint_key", str, "Which network of a --pretrained_weights checkpoint (teacher)."),
    (("--crops",), "crops", click.Choice(CROP_RECIPES), "Augmentation recipe: dino (DINO's) or paper (the paper's "
                                                        "BDD10K one: scales 0.3-1 / 0.1-0.3, plain global crops)."),
    (spellings("--buffer-size"), "buffer_size", int, "Images in the rare buffer, C (paper: 32)."),
    (spellings("--calib-size"), "calib_size", int, "Calibration images for the detector statistics (paper: 256 or "
                                                   "1024)."),
    (spellings("--calib-frac"), "calib_frac", float, "Calibrate on this fraction of the data instead (e.g. 0.05)."),
    (spellings("--ood-percentile"), "ood_percentile", float, "Threshold percentile of calibration scores (0.80-0.99; "
                                                             "0.95)."),
    (spellings("--dense-layer"), "dense_layer", click.Choice(DENSE_LAYERS),
     "Dense rarity: score every position of this feature map (layer2 | layer3 | layer4 of a ResNet, tokens of a "
     "ViT) and flag an image whose most rare position is rare (default: pooled embeddings, the paper's)."),
    (spellings("--global-size"), "global_size", CROP_SIZE, "Global crop size in pixels: H (a square; 224) or H W "
                                                           "(height, width), e.g. 512 1024."),
    (spellings("--local-size"), "local_size", CROP_SIZE, "Local crop size in pixels: H (96) or H W, e.g. 224 448."),
    (spellings("--epoch-length"), "epoch_length", int, "Images per epoch (default: the dataset)."),
    (spellings("--max-steps"), "max_steps", int, "Stop after this many steps (smoke tests)."),
]

#: DINO's two crop-scale options: two numbers each, as in DINO's README ("--global_crops_scale 0.14 1").
SCALE_OPTIONS = {"global_crops_scale": "Global crop area range, e.g. 0.14 1 (DINO 0.4 1; --crops paper 0.3 1).",
                 "local_crops_scale": "Local crop area range, e.g. 0.05 0.14 (DINO 0.05 0.4; --crops paper 0.1 0.3)."}

#: TrainConfig field -> the option that sets it (its first spelling), so a config error names an option.
FLAGS: dict[str, str] = {name: flags[0] for flags, name, _, _ in DINO_OPTIONS} | {
    "aug": "--aug", "detector": "--detector", "detector_weights": "--detector-weights", "metric": "--metric",
    "threshold_mode": "--threshold", "replay": "--replay", "replay_store": "--replay-store", "data": "--data",
    "data_root": "--data-root",
    "global_crops_scale": "--global_crops_scale", "local_crops_scale": "--local_crops_scale",
    "crop_ratio": "--crop-ratio",
}


def flag_names(ctx: click.Context | None) -> dict[str, str]:
    """:data:`FLAGS` in the spellings the command line used (``--data_root`` if that is what was typed)."""
    names = dict(FLAGS)
    if ctx is None:
        return names
    for param in ctx.command.params:
        if param.name in names and isinstance(param, click.Option):
            names[param.name] = typed_flag(ctx, list(param.opts))
    return names


def _in_range(name: str):
    """Parse-time check of one option against TrainConfig's limits (oodfast.train.config.FIELD_RANGES)."""
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is not None:
            try:
                check_field(name, value)
            except ConfigError as e:
                raise click.UsageError(e.render(flag_names(ctx)), ctx) from None
        return value
    return callback


def _dino_options(fn):
    for flags, name, typ, help_text in reversed(DINO_OPTIONS):
        extra = dict(is_flag=False, flag_value="true") if typ is BOOL_FLAG else {}
        fn = click.option(*flags, name, type=typ, default=None, help=help_text, callback=_in_range(name), **extra)(fn)
    for name, help_text in reversed(SCALE_OPTIONS.items()):
        fn = click.option(f"--{name}", name, type=float, nargs=2, default=None, help=help_text,
                          callback=lambda _c, _p, v: tuple(v) if v else None)(fn)
    return click.option(*spellings("--crop-ratio"), "crop_ratio", type=float, nargs=2, default=None,
                        callback=lambda _c, _p, v: tuple(v) if v else None,
                        help="Crop aspect-ratio range, width / height, of every view (DINO 0.75 1.33; --preset "
                             "paper-code 1.5 2.5).")(fn)


def _data_source(ctx: click.Context, data: str, data_root: Path | None, data_path: Path | None) -> tuple[str, Path | None]:
    """(data, data_root), with DINO's ``--data_path DIR`` read as ``--data folder --data-root DIR``."""
    if data_path is None:
        return data, data_root
    names = flag_names(ctx)
    if ctx.get_parameter_source("data") == ParameterSource.COMMANDLINE and data != "folder":
        raise click.UsageError(f"--data_path {data_path} is an image-folder tree (--data folder), but {names['data']} "
                               f"says {data}: drop one of them", ctx)
    if data_root is not None and Path(data_root).expanduser().resolve() != Path(data_path).expanduser().resolve():
        raise click.UsageError(f"--data_path {data_path} and {names['data_root']} {data_root} name different folders: "
                               "give one of them", ctx)
    return "folder", data_path


def _launcher(ctx: click.Context, dist_url: str | None, local_rank: int | None) -> None:
    """DINO's ``--dist_url`` and ``--local_rank``: the process group is joined from the launcher's
    environment (torchrun, torch.distributed.launch). ``env://`` is that; ``tcp://HOST:PORT`` becomes
    MASTER_ADDR / MASTER_PORT where those are unset. ``--local_rank`` (torch.distributed.launch passes
    it) must agree with LOCAL_RANK, which wins; without LOCAL_RANK under a launcher it sets it."""
    if dist_url is not None and dist_url != "env://":
        host, _, port = dist_url.removeprefix("tcp://").rpartition(":")
        if not dist_url.startswith("tcp://") or not host or not port.isdigit():
            raise click.UsageError(f"--dist_url {dist_url!r}: oodfast joins the process group from the launcher's "
                                   "environment; use env:// (the default) or tcp://HOST:PORT, and launch with "
                                   "torchrun", ctx)
        os.environ.setdefault("MASTER_ADDR", host)
        os.environ.setdefault("MASTER_PORT", port)
    if local_rank is None:
        return
    env = os.environ.get("LOCAL_RANK")
    if env is not None and env.strip() != str(local_rank):
        raise click.UsageError(f"--local_rank {local_rank} contradicts LOCAL_RANK={env} set by the launcher; drop "
                               "--local_rank (torchrun sets LOCAL_RANK)", ctx)
    if env is None and "WORLD_SIZE" in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)


class TrainCommand(SpellingCommand):
    """``oodfast train``'s command: the crop sizes take H or H W."""

    pair_options = tuple(spellings("--global-size", "--local-size"))


@click.command(cls=TrainCommand)
@click.option("--data", "data", type=DATA_KINDS, default="synthetic", show_default=True,
              help="Dataset layout; synthetic (synthdrive) is generated on first use.")
@click.option(*spellings("--data-root"), "data_root", type=click.Path(path_type=Path), default=None,
              help="Dataset folder.")
@click.option("--data_path", "data_path", type=click.Path(path_type=Path), default=None,
              help="DINO's: an image-folder tree (the same as --data folder --data-root DIR).")
@click.option(*spellings("--synthetic-images"), "synthetic_images", type=click.IntRange(min=8), default=None,
              help="--data synthetic: frames to generate (default 2400).")
@click.option(*spellings("--synthetic-size"), "synthetic_size", default=None,
              callback=lambda c, p, v: parse_size(c, p, v) if v else None,
              help="--data synthetic: frame size WxH (default 640x360).")
@click.option("--preset", type=click.Choice(["auto", "paper", "paper-code", "cpu"]), default="auto", show_default=True,
              help="auto: the paper's recipe on a GPU, a small resnet18 run on a CPU; paper-code: the paper's recipe "
                   "with its code's BDD100K crops (512 x 1024 global, 224 x 448 local, aspect ratio 1.5-2.5).")
@click.option("--aug", type=click.Choice(["dali", "paper", "torch", "reference"]), default=None,
              help="Multi-crop backend: DALI (default), the paper's PIL path (also spelled reference), "
                   "or torchvision on the device.")
@click.option("--detector", type=click.Choice(["teacher", "frozen"]), default=None,
              help="teacher: the teacher backbone in eval mode on each image's clean view (one extra forward of B rows); "
                   "frozen: a separate frozen ResNet-50 from --detector-weights (the paper).")
@click.option(*spellings("--detector-weights"), "detector_weights", type=click.Path(dir_okay=False), default=None,
              help="ResNet-50 state dict (e.g. dino_resnet50_pretrain.pth) or a DINO checkpoint, for --detector frozen.")
@click.option("--metric", type=click.Choice(["euclidean", "cosine", "mahalanobis", "knn"]), default=None,
              help="Rarity score (paper: euclidean distance to the mean).")
@click.option("--threshold", "threshold_mode", type=click.Choice(["fixed", "online"]), default=None,
              help="online: adapt the threshold on the device to hold the calibrated flag rate.")
@click.option(*spellings("--no-ood"), "no_ood", is_flag=True, help="Plain DINO: no buffer (ablation).")
@click.option("--replay", type=click.Choice(["ood", "random", "oracle", "oracle-matched"]), default=None,
              help="random: a buffer of randomly chosen images (replay without detection); oracle: images that "
                   "truly hold rare objects, from the masks (the upper bound; needs BDD10K-layout masks); "
                   "oracle-matched: those images, flagged at the random arm's rate.")
@click.option(*spellings("--replay-store"), "replay_store", type=click.Choice(["crops", "ids"]), default=None,
              help="crops (the paper's): replay the buffered images' stored crops as they are; ids: keep their "
                   "ids and re-decode and re-augment them every step (new crops; --aug dali or torch).")
@click.option(*spellings("--no-compile"), "no_compile", is_flag=True, help="Run the step eagerly (no torch.compile).")
@click.option("--tensorboard", is_flag=True, help="Also log the scalars to TensorBoard (output_dir/tb; extra 'tensorboard').")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Checkpoint to continue from.")
@click.option("--device", type=DEVICE, default=None, help="cpu, cuda or cuda:N [default: cuda when available].")
@click.option("--dist_url", default=None, help="DINO's: env:// (the default: the launcher's environment) or "
                                               "tcp://HOST:PORT.")
@click.option("--local_rank", type=int, default=None, help="Passed by torch.distributed.launch; LOCAL_RANK wins.")
@report_options
@_dino_options
def train(data: str, data_root: Path | None, data_path: Path | None, synthetic_images: int | None,
          synthetic_size: tuple[int, int] | None, preset: str, aug: str | None, detector: str | None,
          detector_weights: str | None, metric: str | None, threshold_mode: str | None, no_ood: bool, replay: str | None,
          replay_store: str | None, no_compile: bool, tensorboard: bool, resume: str | None, device: str | None,
          dist_url: str | None, local_rank: int | None, json_path: Path | None, markdown_path: Path | None,
          **dino: Any) -> None:
    """Train DINO with the OOD replay buffer (default: on synthdrive, anywhere)."""
    from oodfast.devices import default_device
    from oodfast.report import markdown_table, write_report
    from oodfast.train.checkpoint import check_checkpoint_file, check_writable_dir
    from oodfast.train.config import PRESETS, preset_for
    from oodfast.train.pictures import format_summary
    from oodfast.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

    ctx = click.get_current_context()
    data, data_root = _data_source(ctx, data, data_root, data_path)
    _launcher(ctx, dist_url, local_rank)
    device = device or default_device()
    name = preset_for(device) if preset == "auto" else preset
    overrides = {k: v for k, v in dino.items() if v is not None}
    overrides.update({k: v for k, v in dict(aug=aug, detector=detector, detector_weights=detector_weights,
                                             metric=metric, threshold_mode=threshold_mode,
                                             replay_store=replay_store).items() if v is not None})
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
        raise click.UsageError(e.render(flag_names(ctx)) + f" (preset {name})", ctx) from None
    check_writable_dir(config.output_dir, "--output_dir")  # before any work: a run that cannot be saved is refused
    check_report_paths(json_path, markdown_path)
    if resume is not None:  # an empty or cut-off file is refused now, not after the data is built
        check_checkpoint_file(resume, "--resume")
    elif (Path(config.output_dir) / "checkpoint.pth").exists():  # the run the trainer continues
        check_checkpoint_file(Path(config.output_dir) / "checkpoint.pth", "--output_dir's run")
    if config.replay == "ood" and config.detector == "frozen" and config.detector_weights:
        check_checkpoint_file(config.detector_weights, flag_names(ctx)["detector_weights"])
    if config.pretrained_weights:
        check_checkpoint_file(config.pretrained_weights, "--pretrained_weights")
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
    click.echo(format_summary(summary))
