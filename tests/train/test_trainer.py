"""The Trainer end to end on a tiny synthdrive: checkpoints, resume, ablations, divergence, compile."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torchvision import models

from oodfast.bench.stages import prepared_trainer as staged  # calibrated, warmed up, one batch staged
from oodfast.detect import RandomDetector, RareDetector
from oodfast.train.checkpoint import CheckpointError, load_checkpoint
from oodfast.train.config import TrainConfig
from oodfast.train.runtime import StopSignals, resolve_device
from oodfast.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

from _tiny import no_host_reads, tiny


def test_a_step_never_reads_a_tensor_on_the_host(data_root, tmp_path):
    """Nothing in a step waits for the device: the loss and the scalars reach the host a step later,
    through an asynchronous copy (here a log step, the heaviest). The compiled variant of this check is
    in test_compiled_steps_match_eager_without_recompiling."""
    t = staged(Trainer(tiny(data_root, tmp_path / "nosync"), progress=False))
    t.run_step()  # first step: lazy optimizer state
    with no_host_reads():
        t.run_step(log=True)
    assert t.monitor.settle() == 0 and t.monitor.last["step"] == 0 and t.monitor.last["loss"] > 0


@pytest.mark.parametrize("detector", ["teacher", "random", "ids"])
def test_a_skipped_step_changes_nothing(data_root, tmp_path, detector):
    """A non-finite loss: weights, optimizer, EMA teacher, loss centre, buffer (state, metadata, crops)
    and detector stay exactly as they were, even with a threshold that would flag every image (ids: the
    teacher detector with the re-augmenting store, whose published ids stay those of the ring too)."""
    mode = {"teacher": {}, "random": {"replay": "random"}, "ids": {"replay_store": "ids"}}[detector]
    t = staged(Trainer(tiny(data_root, tmp_path / detector, **mode), progress=False))
    t.run_step()  # the optimizer's state exists
    t.replay.detector.threshold.fill_(-float("inf"))
    original = t.dino.loss.forward
    t.dino.loss.forward = lambda *a, **k: original(*a, **k) * float("nan")

    def snapshot():
        return [x.detach().clone() for x in (*t.dino.student.state_dict().values(), *t.dino.teacher.state_dict().values(),
                *(v for s in t.dino.optimizer.state.values() for v in s.values()), t.dino.loss.center,
                *t.ring.state_dict().values(), *t.ring.views(), *t.replay.detector.state_dict().values())]

    before = snapshot()
    t.run_step()
    after = snapshot()
    assert len(before) == len(after)
    assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(before, after))
    assert t.monitor.settle() == 0 and t.monitor.bad_in_row == 1
    if detector == "ids":
        assert t.replay.host_ids.at(t.step).tolist() == t.ring.ring_ids.tolist()
    t.dino.loss.forward = original
    enqueued = int(t.ring.enqueued_total)
    t.run_step()  # a finite step after it: the same threshold flags the whole batch
    assert int(t.ring.enqueued_total) == enqueued + t.B


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "lr" in r]


def test_short_run_writes_a_dino_checkpoint_that_torchvision_loads(data_root, tmp_path):
    summary = Trainer(tiny(data_root, tmp_path / "run"), progress=False).train()
    assert summary["steps"] == 8
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    for key in ("student", "teacher", "optimizer", "epoch", "args", "dino_loss", "ring", "step", "rng",
                "detector", "config"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    resnet = models.resnet18()
    missing, unexpected = resnet.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}, strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    rec = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][-2]
    for field in ("loss", "lr", "weight_decay", "momentum", "teacher_entropy", "entropy_ratio", "flag_rate",
                  "threshold", "buffer", "images_per_s"):
        assert field in rec, field
    assert rec["buffer"] == 2 and 0 < rec["entropy_ratio"] <= 1.0


def test_a_run_leaves_dinos_log_txt_its_pictures_and_a_readable_summary(data_root, tmp_path):
    import numpy as np
    from PIL import Image

    from oodfast.train.pictures import format_summary

    t = Trainer(tiny(data_root, tmp_path / "seen"), progress=False)
    summary = t.train()
    out = tmp_path / "seen"
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and all(set(r) == {"train_loss", "train_lr", "train_wd", "epoch"}
                                                         for r in lines)
    per_step = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epoch0 = [r for r in per_step if r.get("epoch") == 0 and "event" not in r]
    assert lines[0]["train_loss"] == pytest.approx(np.mean([r["loss"] for r in epoch0]), rel=1e-6)
    assert lines[0]["train_lr"] == pytest.approx(np.mean(t.dino.schedules.lr[:4]))
    assert lines[1]["train_wd"] == pytest.approx(np.mean(t.dino.schedules.weight_decay[4:8]))
    sheet = np.asarray(Image.open(summary["buffer_png"]))
    assert Path(summary["buffer_png"]) == out / "buffer.png" and sheet.shape[0] > 64 and sheet.std() > 10
    assert Image.open(summary["curves_png"]).size[0] > 400
    text = format_summary({"preset": "cpu", "device": "cpu", **summary})
    assert "loss " in text and "buffer 2 images" in text and "buffer.png" in text and "log.txt" in text


def test_checkpoint_keys_are_unchanged_and_one_saved_before_the_threshold_mode_rename_resumes(data_root, tmp_path):
    """The checkpoint layout stays as it was (top level, ring, detector), and a checkpoint whose stored
    config still says ``threshold`` (the mode's earlier name) resumes, and is checked, under the new name."""
    out = tmp_path / "old"
    t = Trainer(tiny(data_root, out, threshold_mode="online"), progress=False)
    t.save(0, numbered=False)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert set(ckpt) == {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "step", "config", "ring",
                         "detector", "rng", "epoch_losses"}
    assert set(ckpt["ring"]) == {"ring_ids", "ring_scores", "ring_steps", "state", "crops0", "crops1"}
    assert set(ckpt["detector"]) == {"center", "proj", "coef", "alpha", "bank", "threshold", "spread", "flag_rate",
                                     "fitted"}
    for stored in (ckpt["config"], ckpt["args"]):
        stored["threshold"] = stored.pop("threshold_mode")
    torch.save(ckpt, out / "checkpoint.pth")
    again = Trainer(tiny(data_root, out, threshold_mode="online"), progress=False)
    assert again.resumed and again.step == 0
    with pytest.raises(ValueError, match="threshold_mode: 'online' in the run, 'fixed' now"):
        Trainer(tiny(data_root, out), progress=False)


def test_the_same_command_again_continues_its_run_and_a_contradicting_one_is_refused(data_root, tmp_path):
    """As facebookresearch/dino: a rerun into an output_dir holding a run continues it from
    checkpoint.pth (a requeued cluster job keeps its progress) instead of replacing it."""
    out = tmp_path / "run"
    Trainer(tiny(data_root, out, max_steps=4), progress=False).train()
    (out / ".checkpoint.pth.x1y2.tmp").write_bytes(b"half a checkpoint")  # a write cut short by SIGKILL
    again = Trainer(tiny(data_root, out), progress=False)
    assert again.resumed and again.step == 4
    assert not list(out.glob(".checkpoint*.tmp")), "the interrupted write's temp file is removed"
    assert again.train()["steps"] == 8
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "lr" in r and "event" not in r]
    assert steps == list(range(8)), "each step logged once: the logs continue, not mix"
    assert Trainer(tiny(data_root, out), progress=False).train()["steps"] == 8  # complete: nothing to do
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 8
    with pytest.raises(ValueError, match="new --output_dir") as refused:
        Trainer(tiny(data_root, out, batch_size_per_gpu=2, out_dim=32), progress=False)
    assert "batch_size_per_gpu: 4 in the run, 2 now" in str(refused.value)
    assert "out_dim: 64 in the run, 32 now" in str(refused.value)
    with pytest.raises(ValueError, match="arch: 'resnet18' in the run, 'resnet34' now"):
        Trainer(tiny(data_root, out, arch="resnet34"), progress=False, resume=out / "checkpoint.pth")


def test_a_second_signal_during_an_epoch_end_checkpoint_waits_for_the_write(data_root, tmp_path):
    """Every checkpoint write defers signals, not only the stop's: two SIGTERMs during the end-of-epoch
    write leave a complete checkpoint, and the run then stops with the first."""
    import subprocess
    import sys

    out = tmp_path / "deferred"
    script = tmp_path / "deferred.py"
    script.write_text(
        f"import os, signal, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from test_trainer import tiny\n"
        "import oodfast.train.trainer as tm\n"
        "save = tm.save_checkpoint\n"
        "def save_under_fire(path, state):\n"
        "    if state['step'] == 4:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return save(path, state)\n"
        "tm.save_checkpoint = save_under_fire\n"
        f"t = tm.Trainer(tiny({data_root!r}, Path({str(out)!r})), progress=False)\n"
        "try:\n"
        "    t.train()\n"
        "except tm.TrainingInterrupted as e:\n"
        "    print('STOPPED', t.step, e.signum)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "STOPPED 4 15" in proc.stdout, proc.stderr[-3000:]
    assert "the checkpoint is being written" in proc.stderr
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 4
    assert not list(out.glob(".checkpoint*.tmp"))


def test_resume_reproduces_the_uninterrupted_run(data_root, tmp_path):
    full = Trainer(tiny(data_root, tmp_path / "full"), progress=False)
    full.train()
    first = Trainer(tiny(data_root, tmp_path / "part", max_steps=4), progress=False)
    first.train()  # one epoch, checkpoint at its end
    resumed = Trainer(tiny(data_root, tmp_path / "part"), progress=False,
                      resume=tmp_path / "part" / "checkpoint.pth")
    resumed.train()
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    assert torch.equal(resumed.ring.ring_ids, full.ring.ring_ids)


def test_sigterm_mid_epoch_checkpoints_that_step_and_resume_continues_exactly(data_root, tmp_path):
    import os
    import signal

    # an online threshold and a fast-moving teacher: a resume that re-fitted the detector, or lost its
    # adapted threshold, would show in the per-step records
    moving = dict(threshold_mode="online", momentum_teacher=0.9)
    full = Trainer(tiny(data_root, tmp_path / "full", **moving), progress=False)
    full.train()
    out = tmp_path / "part"
    trainer = Trainer(tiny(data_root, out, **moving), progress=False)
    post = trainer.dino._post

    def post_then_preempt(*args):  # SIGTERM arrives during step 5 (the second of epoch 1's four)
        post(*args)
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.dino._post = post_then_preempt
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM: stopped after step 6 of 8.*--resume") as e:
        trainer.train()
    assert e.value.signum == signal.SIGTERM and e.value.checkpoint == out / "checkpoint.pth"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handlers are given back
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 6 and ckpt["epoch"] == 1  # DINO's key: epoch 1 is to be run again
    assert (out / "checkpoint0001.pth").exists() and not (out / "checkpoint0002.pth").exists()
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"step": 6, "epoch": 1, "event": "interrupted", "signal": "SIGTERM"} in events

    resumed = Trainer(tiny(data_root, out, **moving), progress=False, resume=out / "checkpoint.pth")
    resumed.train()
    keys = ("step", "loss", "threshold", "flag_rate", "buffer")
    assert records(out, keys) == pytest.approx(records(tmp_path / "full", keys), rel=1e-5)
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 8
    assert torch.equal(resumed.ring.ring_ids, full.ring.ring_ids)
    for name, value in full.replay.detector.state_dict().items():
        torch.testing.assert_close(resumed.replay.detector.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def records(out: Path, keys: tuple[str, ...]) -> list[float]:
    """The per-step (and epoch-end) records of a run's log, reduced to ``keys``, flattened."""
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [float(r[k]) for r in recs if "lr" in r for k in keys]


def test_a_second_signal_goes_to_the_previous_handler_and_ignored_signals_stay_ignored():
    import signal

    seen = []

    def previous(signum, frame):
        seen.append(signum)

    saved = signal.signal(signal.SIGTERM, previous), signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and seen == []  # the first one only asks
            signal.raise_signal(signal.SIGTERM)
            assert seen == [signal.SIGTERM]  # the second one: what would have happened without us
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])


def test_each_torchrun_process_drives_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", 3) == torch.device("cuda", 3)  # `--device cuda` under torchrun
    assert resolve_device("cuda:1", 3) == torch.device("cuda", 1)  # an explicit index is kept
    assert resolve_device("cpu", 3) == torch.device("cpu")
    assert resolve_device(None, 2) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, 2) == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA GPU.*--device cpu"):
        resolve_device("cuda", 0)


def test_cli_exits_as_the_signal_would_and_says_how_to_resume(monkeypatch, tmp_path):
    import signal

    from click.testing import CliRunner

    from oodfast.cli import main

    def interrupted(self):
        raise TrainingInterrupted("SIGTERM: stopped after step 3 of 8; ckpt holds it: continue with --resume ckpt",
                                  signal.SIGTERM, tmp_path / "ckpt")

    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Trainer, "train", interrupted)
    result = CliRunner().invoke(main, ["train", "--output_dir", str(tmp_path)])
    assert result.exit_code == 128 + signal.SIGTERM and "continue with --resume" in result.output


def test_ablation_flags_change_what_they_claim(data_root, tmp_path):
    plain = Trainer(tiny(data_root, tmp_path / "plain", replay="none", max_steps=2), progress=False)
    plain.train()
    assert plain.ring is None and all(v.shape[0] == 4 for v in plain.views())
    assert load_checkpoint(tmp_path / "plain" / "checkpoint.pth")["ring"] is None

    rand = Trainer(tiny(data_root, tmp_path / "rand", replay="random", max_steps=2), progress=False)
    rand.train()
    assert isinstance(rand.replay.detector, RandomDetector) and rand.ring.is_full()
    assert all(v.shape[0] == 4 + 2 for v in rand.views())

    ood = Trainer(tiny(data_root, tmp_path / "ood", max_steps=2), progress=False)
    ood.train()
    assert isinstance(ood.replay.detector, RareDetector) and torch.isfinite(ood.replay.detector.threshold)


def test_non_finite_losses_skip_then_stop_keeping_the_checkpoint(data_root, tmp_path):
    out = tmp_path / "div"
    Trainer(tiny(data_root, out, epochs=3, max_steps=4), progress=False).train()
    before = (out / "checkpoint.pth").read_bytes()
    trainer = Trainer(tiny(data_root, out, epochs=3, max_bad_steps=3), progress=False,
                      resume=out / "checkpoint.pth")
    original = trainer.dino.loss.forward
    trainer.dino.loss.forward = lambda *a, **k: original(*a, **k) * float("nan")
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite losses"):
        trainer.train()
    assert (out / "checkpoint.pth").read_bytes() == before
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "non_finite_loss" for e in events) == 3


def test_bad_inputs_are_refused_clearly(data_root, tmp_path):
    with pytest.raises(ValueError, match="--detector-weights PATH"):
        Trainer(tiny(data_root, tmp_path / "x", detector="frozen"), progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "ran"
    evil.write_bytes(pickle.dumps({"student": _Exploit(str(marker))}))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="replay must be one of"):
        TrainConfig(replay="sometimes")


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.slow
def test_compiled_steps_match_eager_without_recompiling(data_root, tmp_path):
    """Compiled forward / post-step over 20 steps: no recompile after warm-up, losses as eager."""
    torch._dynamo.reset()
    cfg = dict(epochs=1, epoch_length=80, max_steps=20)
    eager = Trainer(tiny(data_root, tmp_path / "eager", **cfg), progress=False)
    eager.train()
    compiled = Trainer(tiny(data_root, tmp_path / "compiled", compile=True, **cfg), progress=False)
    compiled.calibrate()
    compiled.warm_up()
    compiled.resumed = True  # calibration and warm-up done; keep them out of the recompile check
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.train()
        # the default (compiled) step reads nothing on the host either
        compiled.step = 5
        batch = next(iter(compiled.loader))
        compiled.stage(batch.views, batch.index, batch.boxes)
        with no_host_reads():
            compiled.run_step(log=True)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)


def torchrun2(tmp_path: Path, name: str, body: str, port: int, returncode: int | None = 0) -> list[str]:
    """Run ``body`` under torchrun with 2 CPU processes (after ``tiny``, ``Trainer``, ``dist`` and
    ``Path`` are imported); returns its stdout lines starting with RANK, sorted. Print each line as one
    string ending in a newline, with end='': print() writes its arguments and its end apart, and the
    ranks' writes would interleave. ``returncode``: the
    expected exit status (None: any non-zero)."""
    import subprocess
    import sys

    head = (f"import os, signal, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from pathlib import Path\n"
            "from test_trainer import tiny\n"
            "from oodfast.train.trainer import Trainer, TrainingInterrupted\n"
            "import torch.distributed as dist\n")
    (tmp_path / f"{name}.py").write_text(head + body + "dist.destroy_process_group()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(tmp_path / f"{name}.py")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 if returncode is None else proc.returncode == returncode, proc.stderr[-3000:]
    return sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK"))


@pytest.mark.slow
def test_two_process_gloo_run(data_root, tmp_path):
    """torchrun with 2 CPU processes and the default compiled step: data parallel over gloo (one
    gradient all-reduce), sharded data, one teacher for all ranks, one ring per rank; rank 0 saves every
    rank's ring, detector and RNG, and a resumed run gives each rank its own."""
    out = tmp_path / "ddp"
    lines = torchrun2(tmp_path, "ddp_run", (
        "import hashlib\n"
        "def digest(m):\n"
        "    return hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()[:16]\n"
        f"t = Trainer(tiny({data_root!r}, Path({str(out)!r}), max_steps=3, epoch_length=32, compile=True),"
        " progress=False)\n"
        "born = digest(t.dino.teacher)\n"
        "s = t.train()\n"
        "print(f'RANK {dist.get_rank()} WORLD {dist.get_world_size()} STEPS {s[\"steps\"]} BORN {born} '\n"
        "      f'STUDENT {digest(t.dino.student)} TEACHER {digest(t.dino.teacher)} IDS {t.replay.ids.tolist()}\\n', end='', flush=True)\n"),
        port=29533)
    assert [line.split()[1] for line in lines] == ["0", "1"]
    assert all("WORLD 2 STEPS 3" in line for line in lines)
    ids = [set(eval(line.split("IDS ")[1])) for line in lines]
    assert not ids[0] & ids[1], "the two ranks must see different images"
    fields = [dict(zip(line.split()[6:12:2], line.split()[7:12:2])) for line in lines]
    # one teacher at birth (it was each rank's own seed's network), and the same weights after three
    # steps of different data on each rank: the gradients were averaged
    assert fields[0] == fields[1], fields

    # each rank's own buffer, detector and RNG are in the checkpoint, and each rank gets its own back
    ranks = load_checkpoint(out / "checkpoint.pth")["ranks"]
    saved = [r["ring"]["ring_ids"].tolist() for r in ranks]
    assert len(saved) == 2 and saved[0] != saved[1]
    lines = torchrun2(tmp_path, "ddp_resume", (
        f"t = Trainer(tiny({data_root!r}, Path({str(out)!r}), max_steps=3, epoch_length=32), progress=False,"
        f" resume=Path({str(out / 'checkpoint.pth')!r}))\n"
        "print(f'RANK {dist.get_rank()} RING {t.ring.ring_ids.tolist()}\\n', end='', flush=True)\n"), port=29536)
    assert lines == [f"RANK {r} RING {saved[r]}" for r in (0, 1)]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(data_root, tmp_path):
    """torchrun, 2 CPU processes: SIGTERM reaches rank 1 only; both ranks stop after the same step
    (otherwise the next collective would hang) and rank 0 checkpoints it before any rank exits."""
    out = tmp_path / "ddp-stop"
    lines = torchrun2(tmp_path, "ddp_stop", (
        f"t = Trainer(tiny({data_root!r}, Path({str(out)!r}), epoch_length=64), progress=False)\n"
        "post = t.dino._post\n"
        "def post_then_signal(*a):\n"
        "    post(*a)\n"
        "    if dist.get_rank() == 1 and t.step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "t.dino._post = post_then_signal\n"
        "try:\n"
        "    t.train()\n"
        "except TrainingInterrupted:\n"
        "    print(f'RANK {dist.get_rank()} STOPPED AT {t.step}\\n', end='', flush=True)\n"), port=29534)
    # the flags ride in each step's gradient all-reduce and are read once the next step is enqueued: the
    # signal, sent after step 2's all-reduce, travels in step 3's and is read after step 4, so both
    # ranks stop after step 4 (t.step 5)
    assert lines == ["RANK 0 STOPPED AT 5", "RANK 1 STOPPED AT 5"]
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 5


@pytest.mark.slow
def test_torchrun_cli_run_stopped_by_a_signal_leaves_the_checkpoint_of_that_step(data_root, tmp_path):
    """Through `oodfast train` under torchrun, with a slow checkpoint write: both ranks get SIGTERM (a
    scheduler signalling the whole job); rank 1 exits 143 as soon as it may, and torchrun then sends
    rank 0 a second SIGTERM. The barrier after the save and the deferred second signal keep rank 0
    alive until the checkpoint is complete."""
    out = tmp_path / "ddp-cli"
    torchrun2(tmp_path, "ddp_cli", (
        "import time\n"
        "import oodfast.train.trainer as trainer_module\n"
        "from oodfast.cli import main\n"
        "save = trainer_module.save_checkpoint\n"
        "trainer_module.save_checkpoint = lambda *a, **k: (time.sleep(2), save(*a, **k))[1]\n"
        "stage = Trainer.stage\n"
        "def stage_then_signal(self, *a):\n"
        "    if self.step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return stage(self, *a)\n"
        "Trainer.stage = stage_then_signal\n"
        f"sys.argv = ['oodfast', 'train', '--data', 'synthetic', '--data-root', {data_root!r}, '--preset', 'cpu',\n"
        "    '--arch', 'resnet18', '--out_dim', '64', '--global-size', '32', '--local-size', '16',\n"
        "    '--local_crops_number', '2', '--batch_size_per_gpu', '4', '--epochs', '2', '--epoch-length', '64',\n"
        "    '--buffer-size', '2', '--calib-size', '8', '--no-compile', '--synthetic-images', '64',\n"
        f"    '--synthetic-size', '128x72', '--output_dir', {str(out)!r}]\n"
        "main()\n"), port=29535, returncode=None)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 4  # in step 2's all-reduce, read after step 3: both ranks stop after step 3
    assert not list(out.glob(".checkpoint.pth.*")), "a checkpoint write was cut short"
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "interrupted" and e["step"] == 4 for e in events)


def test_tensorboard_option(data_root, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:  # the extra is not installed: a clear error, no half-started run
        with pytest.raises(ValueError, match=r"pip install 'oodfast\[tensorboard\]'"):
            Trainer(tiny(data_root, tmp_path / "tb", tensorboard=True), progress=False)
        return
    Trainer(tiny(data_root, tmp_path / "tb", tensorboard=True, max_steps=2), progress=False).train()
    assert any((tmp_path / "tb" / "tb").iterdir())


def test_frozen_detector_mode_scores_with_the_given_weights(data_root, tmp_path):
    """The paper's setup: a separate frozen ResNet-50 loaded from a state dict flags before the forward."""
    torch.manual_seed(0)
    weights = tmp_path / "r50.pth"
    torch.save(models.resnet50().state_dict(), weights)
    t = Trainer(tiny(data_root, tmp_path / "frozen", detector="frozen", detector_weights=str(weights), max_steps=3),
                progress=False)
    t.train()
    assert t.replay.encoder is not None and t.replay.detector.dim == 2048
    assert not any(p.requires_grad for p in t.replay.encoder.parameters())
    assert t.ring.is_full() and torch.isfinite(t.replay.detector.threshold)


@pytest.mark.slow
def test_killed_run_resumes(data_root, tmp_path):
    """SIGKILL mid-run, then --resume: the run continues from the last epoch checkpoint and finishes."""
    import signal
    import subprocess
    import sys
    import time as _time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "oodfast.cli", "train", "--data", "synthetic", "--data-root", data_root,
            "--preset", "cpu", "--arch", "resnet18", "--out_dim", "64", "--global-size", "32", "--local-size", "16",
            "--local_crops_number", "2", "--batch_size_per_gpu", "4", "--epochs", "3", "--epoch-length", "16",
            "--buffer-size", "2", "--calib-size", "8", "--no-compile", "--output_dir", str(out),
            "--synthetic-images", "64", "--synthetic-size", "128x72"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = _time.time() + 300
    while not (out / "checkpoint.pth").exists() and _time.time() < deadline and proc.poll() is None:
        _time.sleep(0.2)
    assert (out / "checkpoint.pth").exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(out / "checkpoint.pth")["step"]
    assert step_at_kill < 12
    done = subprocess.run(args + ["--resume", str(out / "checkpoint.pth")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 12


@pytest.mark.parametrize("mode", ["oracle", "oracle-matched"])
def test_oracle_replay_fills_the_buffer_with_truly_rare_images(data_root, tmp_path, mode):
    import numpy as np
    from PIL import Image

    from oodfast.data.classes import RARE_CLASS_IDS
    from oodfast.detect import OracleDetector

    t = Trainer(tiny(data_root, tmp_path / "oracle", replay=mode, max_steps=4), progress=False)
    t.train()
    assert isinstance(t.replay.detector, OracleDetector) and t.ring.is_full()
    assert t.replay.detector.matched == (mode == "oracle-matched")
    for i in t.ring.ring_ids.tolist():
        mask = np.asarray(Image.open(t.files.masks[i]))
        assert np.isin(mask, RARE_CLASS_IDS).any(), f"image {i} in the oracle buffer has no rare pixels"
