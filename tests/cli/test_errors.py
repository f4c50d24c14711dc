"""Every bad option and mishap through the CLI ends as one line ``oodfast: error: ...`` naming the
option, file or value (status 2 for a bad command line, 1 otherwise); an unexpected exception points at
--debug / OODFAST_DEBUG=1, which show the traceback. The trainer is replaced by a recorder, so these
run in seconds and prove that nothing is started before a refusal."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import oodfast.train.trainer as trainer_mod
from oodfast.cli import main
from oodfast.data.discover import DatasetError
from oodfast.train.checkpoint import CheckpointError, save_checkpoint


class FakeTrainer:
    """Records that the CLI got as far as building a trainer; ``error`` is raised by train()."""

    built: list = []
    error: BaseException | None = None

    def __init__(self, config, *, device=None, resume=None, progress=True) -> None:
        FakeTrainer.built.append((config, device, resume))

    def train(self) -> dict:
        if FakeTrainer.error is not None:
            raise FakeTrainer.error
        return {"steps": 1}


@pytest.fixture(autouse=True)
def fake_trainer(monkeypatch, tmp_path):
    monkeypatch.setattr(trainer_mod, "Trainer", FakeTrainer)
    monkeypatch.setenv("OODFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OODFAST_DEBUG", raising=False)
    FakeTrainer.built, FakeTrainer.error = [], None
    yield


def invoke(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(main, list(args))


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def assert_one_line_error(result, code: int, *words: str) -> str:
    assert result.exit_code == code, result.output
    out = lines(result.output)
    assert len(out) == 1, result.output
    assert out[0].startswith("oodfast: error: "), out[0]
    for w in words:
        assert w in out[0], out[0]
    return out[0]


@pytest.mark.parametrize("option, value, words", [
    ("--lr", "nan", "finite number >= 0"),
    ("--min_lr", "nan", "finite number >= 0"),
    ("--weight_decay", "nan", "finite number >= 0"),
    ("--weight_decay_end", "inf", "finite number >= 0"),
    ("--lr", "-1", "finite number >= 0"),
    ("--momentum_teacher", "2", "in [0, 1]"),
    ("--teacher_temp", "0", "> 0"),
    ("--warmup_teacher_temp", "0", "> 0"),
    ("--clip_grad", "nan", "finite number >= 0"),
    ("--calib-size", "-5", "integer >= 1"),
    ("--calib-frac", "1.5", "in (0, 1]"),
    ("--ood-percentile", "0", "in (0, 1)"),
    ("--max-steps", "-1", "integer >= 1"),
    ("--epoch-length", "-8", "integer >= 1"),
    ("--batch_size_per_gpu", "0", "integer >= 1"),
    ("--epochs", "0", "integer >= 1"),
    ("--out_dim", "0", "integer >= 1"),
    ("--buffer-size", "0", "integer >= 1"),
    ("--global-size", "2", "integer >= 8"),
    ("--local_crops_number", "-1", "integer >= 0"),
    ("--warmup_epochs", "-1", "integer >= 0"),
    ("--saveckp_freq", "-1", "integer >= 0"),
    ("--seed", "-1", "in [0, 2147483647]"),
])
def test_train_numeric_options_are_range_checked_when_parsed(option, value, words, tmp_path):
    result = invoke("train", option, value, "--output_dir", str(tmp_path / "run"))
    assert_one_line_error(result, 2, f"{option} must be", words, value if value not in ("2", "0", "-1") else "got")
    assert FakeTrainer.built == []
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_options_that_contradict_the_preset_name_both_flags(tmp_path):
    result = invoke("train", "--preset", "paper", "--device", "cpu", "--epochs", "5", "--output_dir", str(tmp_path))
    assert_one_line_error(result, 2, "--warmup_epochs (10) must not exceed --epochs (5)", "preset paper")
    assert FakeTrainer.built == []


def test_good_options_reach_the_trainer(tmp_path):
    result = invoke("train", "--lr", "0.001", "--momentum_teacher", "1", "--max-steps", "3", "--output_dir",
                    str(tmp_path / "run"), "--json", str(tmp_path / "s.json"))
    assert result.exit_code == 0, result.output
    (config, device, resume), = FakeTrainer.built
    assert (config.lr, config.momentum_teacher, config.max_steps, device) == (0.001, 1.0, 3, "cpu")
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == 1


@pytest.mark.parametrize("args", [
    ["train"], ["evaluate", "detect"], ["evaluate", "represent"],
])
def test_bogus_device_lists_the_valid_ones(args):
    result = invoke(*args, "--device", "bogus")
    assert_one_line_error(result, 2, "--device", "'bogus' is not a device", "valid devices here: cpu")
    assert FakeTrainer.built == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_when_parsed():
    result = invoke("train", "--device", "cuda:1")
    assert_one_line_error(result, 2, "--device", "torch sees no CUDA GPU", "valid devices here: cpu")


@pytest.mark.parametrize("args, words", [
    (["evaluate", "detect", "--percentiles", "0.9,nan"], "--percentiles"),
    (["evaluate", "detect", "--calib-sizes", "256,1"], "--calib-sizes"),
    (["evaluate", "detect", "--eval-images", "0"], "--eval-images"),
    (["evaluate", "detect", "--crop-size", "-224"], "--crop-size"),
    (["evaluate", "detect", "--tau", "nan"], "--tau"),
    (["evaluate", "detect", "--detectors", "euclid"], "--detectors"),
    (["evaluate", "represent", "--crops-per-image", "0"], "--crops-per-image"),
    (["evaluate", "represent", "--seeds", "0,-1"], "--seeds"),
    (["evaluate", "represent", "--size", "0"], "--size"),
    (["data", "synth", "--out", "x", "--rare-prob", "nan"], "--rare-prob"),
    (["data", "synth", "--out", "x", "--val-fraction", "nan"], "--val-fraction"),
    (["data", "synth", "--out", "x", "--seed", "-1"], "--seed"),
    (["data", "synth", "--out", "x", "--rare-weights", "person=-1"], "--rare-weights"),
])
def test_evaluate_and_data_numeric_options_are_range_checked(args, words):
    assert_one_line_error(invoke(*args), 2, words)


@pytest.mark.parametrize("error, code, words", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/log.jsonl"), 1,
     ["no space left on device: /runs/x/log.jsonl", "free some space"]),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/x/log.jsonl"), 1,
     ["permission denied: /runs/x/log.jsonl", "fix its permissions"]),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x"), 1, ["read-only file system: /runs/x", "writable"]),
    (CheckpointError("checkpoint /runs/x/checkpoint.pth is empty (0 bytes)"), 1, ["/runs/x/checkpoint.pth is empty"]),
    (DatasetError("images/a.jpg: truncated\nsecond line"), 1, ["images/a.jpg: truncated second line"]),
    (FileNotFoundError("no weights file at w.pth; download them"), 1, ["no weights file at w.pth"]),
    (trainer_mod.TrainingDiverged("5 consecutive non-finite losses; lower --lr"), 1, ["non-finite losses"]),
])
def test_known_errors_are_one_clean_line(error, code, words, tmp_path):
    FakeTrainer.error = error
    result = invoke("train", "--output_dir", str(tmp_path / "run"))
    assert_one_line_error(result, code, *words)
    assert "Traceback" not in result.output


def test_an_interrupted_run_exits_as_the_signal_would(tmp_path):
    FakeTrainer.error = trainer_mod.TrainingInterrupted("stopped by SIGTERM after step 3", 15, tmp_path / "c.pth")
    result = invoke("train", "--output_dir", str(tmp_path / "run"))
    assert result.exit_code == 128 + 15 and "SIGTERM" in result.output


def test_an_unexpected_exception_is_one_line_with_a_debug_pointer(tmp_path):
    FakeTrainer.error = IndexError("list index out of range")
    result = invoke("train", "--output_dir", str(tmp_path / "run"))
    line = assert_one_line_error(result, 1, "unexpected IndexError: list index out of range",
                                 "run again with --debug (or OODFAST_DEBUG=1) for the traceback")
    assert "test_errors.py" in line  # where it was raised
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_original_exception(tmp_path, how):
    FakeTrainer.error = IndexError("list index out of range")
    args = (["--debug"] if how == "flag" else []) + ["train", "--output_dir", str(tmp_path / "run")]
    result = invoke(*args, env={"OODFAST_DEBUG": "1"} if how == "env" else None)
    assert result.exit_code == 1 and isinstance(result.exception, IndexError)


def test_debug_prints_the_traceback_in_a_real_process(tmp_path):
    code = ("import sys, oodfast.train.trainer as t\n"
            "class F:\n"
            "    def __init__(self, *a, **k): pass\n"
            "    def train(self): raise KeyError('boom')\n"
            "t.Trainer = F\n"
            "from oodfast.cli import main\n"
            "main()\n")
    cmd = [sys.executable, "-c", code, "train", "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "OODFAST_CACHE": str(tmp_path / "cache")}
    env.pop("OODFAST_DEBUG", None)
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "oodfast: error: unexpected KeyError: 'boom'" in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OODFAST_DEBUG": "1"}, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and "KeyError: 'boom'" in debug.stderr


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a folder")
    assert_one_line_error(invoke("train", "--output_dir", str(f)), 1, f"--output_dir {f} is a file")
    assert FakeTrainer.built == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_output_dir_is_refused_before_any_work(tmp_path, monkeypatch, code):
    import tempfile

    def refuse(*a, **kw):  # root writes anywhere: a read-only mount / no permission, simulated
        raise OSError(code, os.strerror(code), kw.get("dir"))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = invoke("train", "--output_dir", str(tmp_path / "run"))
    assert_one_line_error(result, 1, f"--output_dir {tmp_path / 'run'} is not writable ({os.strerror(code)})")
    assert FakeTrainer.built == []


def test_report_path_in_an_unusable_folder_is_refused_before_any_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = invoke("train", "--output_dir", str(tmp_path / "run"), "--json", str(f / "summary.json"))
    assert_one_line_error(result, 1, "--json", "is a file")
    assert FakeTrainer.built == []


def _checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "good.pth", {"student": {"w": torch.zeros(4096)}, "teacher": {}, "optimizer": {},
                                                   "epoch": 0, "args": {}, "dino_loss": {}})


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes"])
@pytest.mark.parametrize("option", ["--resume", "--detector-weights"])
def test_damaged_checkpoints_are_named_before_any_work(tmp_path, damage, option):
    bad = tmp_path / "bad.pth"
    data = _checkpoint(tmp_path).read_bytes()
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random bytes": os.urandom(999)}[damage])
    extra = ["--detector", "frozen"] if option == "--detector-weights" else []
    result = invoke("train", *extra, option, str(bad), "--output_dir", str(tmp_path / "run"))
    words = "is empty (0 bytes)" if damage == "empty" else "is truncated or not a torch checkpoint"
    assert_one_line_error(result, 1, f"{option}: ", str(bad), words)
    assert FakeTrainer.built == []


def test_a_damaged_checkpoint_in_the_output_dir_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"")
    result = invoke("train", "--output_dir", str(run))
    assert_one_line_error(result, 1, str(run / "checkpoint.pth"), "is empty")
    assert FakeTrainer.built == []


@pytest.mark.parametrize("command", ["detect", "represent"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_evaluate_encoder_damaged_checkpoint_is_named(tmp_path, command, damage):
    bad = tmp_path / "enc.pth"
    data = _checkpoint(tmp_path).read_bytes()
    bad.write_bytes(b"" if damage == "empty" else data[:-64])
    result = invoke("evaluate", command, "--encoder", str(bad), "--arch", "resnet18")
    words = "is empty (0 bytes)" if damage == "empty" else "is truncated or not a torch checkpoint"
    assert_one_line_error(result, 1, str(bad), words)
    assert not (tmp_path / "cache").exists()  # refused before the dataset was built


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", b"\x00\x01\x02{}"])
def test_evaluate_compare_on_a_binary_file_names_it(tmp_path, content):
    binary = tmp_path / "image.png"
    binary.write_bytes(content)
    result = invoke("evaluate", "compare", f"ood={binary}")
    assert_one_line_error(result, 1, f"arm ood: {binary} is a binary file", "evaluate represent --json")


def test_evaluate_compare_on_bad_json_names_it(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text('{"dominant": ')
    assert_one_line_error(invoke("evaluate", "compare", f"x={bad}"), 1, f"{bad} is not valid JSON (line 1")


def test_usage_errors_are_one_line_too():
    assert_one_line_error(invoke("train", "--lrr", "3"), 2, "No such option", "--lr", "oodfast train --help")
    assert_one_line_error(invoke("train", "--no-ood", "--replay", "random"), 2, "--no-ood and --replay")
