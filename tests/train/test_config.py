"""TrainConfig refuses out-of-range values by name: the one table the API and the CLI share."""

from __future__ import annotations

import dataclasses
import math

import pytest

from oodfast.train.config import FIELD_RANGES, ConfigError, TrainConfig

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("field, value, words", [
    ("lr", NAN, "finite number >= 0"),
    ("min_lr", NAN, "finite number >= 0"),
    ("weight_decay", NAN, "finite number >= 0"),
    ("weight_decay_end", INF, "finite number >= 0"),
    ("lr", -1.0, "finite number >= 0"),
    ("momentum_teacher", 2.0, "in [0, 1]"),
    ("momentum_teacher", NAN, "in [0, 1]"),
    ("teacher_temp", 0.0, "> 0"),
    ("warmup_teacher_temp", -0.04, "> 0"),
    ("clip_grad", INF, "finite number >= 0"),
    ("calib_size", -5, "integer >= 1"),
    ("max_steps", -1, "integer >= 1"),
    ("epoch_length", -8, "integer >= 1"),
    ("epoch_length", 0, "integer >= 1"),
    ("batch_size_per_gpu", 0, "integer >= 1"),
    ("epochs", 0, "integer >= 1"),
    ("epochs", 2.5, "an integer"),
    ("out_dim", 0, "integer >= 1"),
    ("buffer_size", 0, "integer >= 1"),
    ("global_size", 4, "integer >= 8"),
    ("local_size", 0, "integer >= 8"),
    ("local_crops_number", -1, "integer >= 0"),
    ("warmup_epochs", -1, "integer >= 0"),
    ("freeze_last_layer", -1, "integer >= 0"),
    ("ood_percentile", 1.0, "in (0, 1)"),
    ("calib_frac", 0.0, "in (0, 1]"),
    ("calib_frac", NAN, "in (0, 1]"),
    ("seed", -1, "in [0, 2147483647]"),
    ("seed", True, "an integer"),
    ("log_every", 0, "integer >= 1"),
    ("max_bad_steps", 0, "integer >= 1"),
    ("num_workers", -2, "integer >= 0"),
    ("saveckp_freq", -1, "integer >= 0"),
])
def test_out_of_range_values_are_refused_by_name(field, value, words):
    with pytest.raises(ConfigError) as info:
        TrainConfig.cpu(**{field: value})
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field} must be ") and words in message and repr(value) in message
    assert "\n" not in message
    # the CLI words the same check with its flag
    assert info.value.render({field: "--flag"}).startswith("--flag must be ")


@pytest.mark.parametrize("changes", [
    dict(lr=0.0), dict(momentum_teacher=0.0), dict(momentum_teacher=1.0), dict(calib_frac=1.0), dict(clip_grad=0.0),
    dict(max_steps=None, epoch_length=None, num_workers=None), dict(local_crops_number=0), dict(saveckp_freq=0),
    dict(seed=2**31 - 1), dict(lr=1), dict(warmup_epochs=2, epochs=2),
])
def test_edge_values_are_accepted(changes):
    assert all(getattr(TrainConfig.cpu(**changes), k) == v for k, v in changes.items())


def test_presets_and_their_stored_form_are_valid():
    for cfg in (TrainConfig.paper(), TrainConfig.cpu()):
        assert TrainConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()  # a checkpoint's config loads back


def test_cross_field_limits_name_both_fields():
    with pytest.raises(ConfigError) as info:
        TrainConfig.paper(epochs=5)  # the paper's 10 warm-up epochs
    assert info.value.fields == ("warmup_epochs", "epochs")
    assert info.value.render({"warmup_epochs": "--warmup_epochs", "epochs": "--epochs"}) == (
        "--warmup_epochs (10) must not exceed --epochs (5); lower --warmup_epochs or raise --epochs")
    with pytest.raises(ConfigError, match="warmup_teacher_temp_epochs"):
        TrainConfig.cpu(warmup_teacher_temp_epochs=3)


@pytest.mark.parametrize("field, value", [
    ("global_crops_scale", (0.5, 0.2)), ("local_crops_scale", (0.0, 0.4)), ("local_crops_scale", (0.05, NAN)),
    ("global_crops_scale", (0.4,)), ("metric", "euclid"), ("aug", "pil"), ("threshold_mode", "adaptive"),
    ("replay", "sometimes"), ("output_dir", ""),
])
def test_other_bad_settings_are_refused(field, value):
    with pytest.raises(ConfigError) as info:
        TrainConfig.cpu(**{field: value})
    assert info.value.field == field and field in str(info.value)


def test_every_numeric_field_has_a_range():
    """A new int / float field must be added to FIELD_RANGES, or it would go unchecked."""
    numeric = {f.name for f in dataclasses.fields(TrainConfig)
               if any(t in str(f.type) for t in ("int", "float")) and "tuple" not in str(f.type)}
    assert numeric == set(FIELD_RANGES)


def test_the_replay_store_is_crops_or_ids_and_ids_needs_a_loader_that_re_augments():
    from oodfast.train.config import ConfigError, TrainConfig

    assert TrainConfig().replay_store == "crops"  # the paper's
    with pytest.raises(ConfigError, match="replay_store must be one of crops, ids, got 'pixels'"):
        TrainConfig(replay_store="pixels")
    with pytest.raises(ConfigError, match="replay_store ids needs aug dali or torch"):
        TrainConfig(replay_store="ids", aug="paper")
    assert TrainConfig(replay_store="ids", aug="torch").replay_store == "ids"
