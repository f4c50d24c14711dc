"""load_checkpoint / save_checkpoint / check_writable_dir: every damaged file and unusable folder ends
in one line naming it; a code-executing pickle is refused unexecuted."""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from oodfast.train import checkpoint as ckpt_mod
from oodfast.train.checkpoint import (
    CheckpointError,
    OutputDirError,
    check_checkpoint_file,
    check_writable_dir,
    load_checkpoint,
    save_checkpoint,
)


def minimal(n: int = 4096) -> dict:
    return {"student": {"w": torch.arange(n, dtype=torch.float32)}, "teacher": {"w": torch.zeros(n)},
            "optimizer": {}, "epoch": 1, "args": {"arch": "resnet18"}, "dino_loss": {"center": torch.zeros(1, 8)}}


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_saved_checkpoint_loads(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pth", minimal())
    assert torch.equal(load_checkpoint(path)["student"]["w"], minimal()["student"]["w"])


def _damaged_files(tmp_path: Path) -> dict[str, Path]:
    good = save_checkpoint(tmp_path / "good.pth", minimal())
    data = good.read_bytes()
    legacy = tmp_path / "legacy_src.pth"
    torch.save(minimal(), legacy, _use_new_zipfile_serialization=False)
    files = {
        "half of a zip checkpoint": data[: len(data) // 2],
        "a zip checkpoint without its last bytes": data[:-40],
        "the first 100 bytes": data[:100],
        "half of a legacy checkpoint": legacy.read_bytes()[: legacy.stat().st_size // 2],
        "a legacy checkpoint's first 20 bytes": legacy.read_bytes()[:20],
        "random bytes": bytes(range(7, 250)) * 3,
        "text": b"hello world.\n",
    }
    out = {}
    for i, (name, content) in enumerate(files.items()):
        out[name] = tmp_path / f"bad{i}.pth"
        out[name].write_bytes(content)
    return out


def test_empty_file_is_named_as_empty(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(empty)
    message = str(info.value)
    assert str(empty) in message and "is empty (0 bytes)" in message and "\n" not in message
    with pytest.raises(CheckpointError, match=r"^--resume: checkpoint .* is empty"):
        check_checkpoint_file(empty, "--resume")


def test_truncated_or_foreign_files_are_named(tmp_path):
    for name, path in _damaged_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and "truncated or not a torch checkpoint" in message, name
        assert "\n" not in message, name


def test_cheap_check_catches_cut_off_and_foreign_files(tmp_path):
    """What the CLI runs before building data: a cut-off zip, random bytes and text are caught without
    loading; the file's size is returned for a plausible one."""
    damaged = _damaged_files(tmp_path)
    for name in ("half of a zip checkpoint", "a zip checkpoint without its last bytes", "random bytes", "text"):
        with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
            check_checkpoint_file(damaged[name], "--resume")
    good = tmp_path / "good.pth"
    assert check_checkpoint_file(good) == good.stat().st_size
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*\(a folder, not a file\)"):
        check_checkpoint_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*\(missing\)"):
        load_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize("fmt", ["raw pickle", "torch zip", "torch legacy"])
def test_code_executing_pickles_are_refused_unexecuted(tmp_path, fmt):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    payload = {**minimal(16), "student": _Exploit(str(marker))}
    if fmt == "raw pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil, _use_new_zipfile_serialization=fmt == "torch zip")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    assert str(info.value).startswith(f"refusing to load {evil}:") and "could run code" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_a_plain_non_checkpoint_is_named(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointError, match="is not a DINO/oodfast training checkpoint"):
        load_checkpoint(weights)  # oodfast.encoders falls back to a plain state dict on this message


Usage = namedtuple("Usage", "total used free")


def test_full_disk_is_named_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    """torch.save on a full device fails with RuntimeError 'unexpected pos ...' (here: a real write to
    /dev/full); save_checkpoint names the disk, the sizes and the intact previous checkpoint."""
    path = save_checkpoint(tmp_path / "checkpoint.pth", minimal())
    before = path.read_bytes()
    real_save = torch.save
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real_save(obj, "/dev/full", **kw))
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OSError) as info:
        save_checkpoint(path, minimal())
    assert info.value.errno == errno.ENOSPC
    message = info.value.strerror
    assert f"no space left on the device to write {path}" in message and "--output_dir" in message
    assert "the previous checkpoint.pth is intact" in message and "\n" not in message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary file left


def test_other_write_failures_are_named(tmp_path, monkeypatch):
    def fail(obj, f, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:1] . something\nmore")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path / "checkpoint.pth", minimal())
    assert info.value.strerror.startswith(f"cannot write checkpoint {tmp_path / 'checkpoint.pth'} (")
    assert "\n" not in info.value.strerror


def test_writable_dir_is_created_and_left_clean(tmp_path):
    out = check_writable_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_file_is_not_an_output_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match=rf"^--output_dir {f} is a file, not a folder"):
        check_writable_dir(f)
    with pytest.raises(OutputDirError, match=rf"--output_dir {f / 'sub'} is inside {f}, which is a file"):
        check_writable_dir(f / "sub")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_unwritable_dir_is_refused(tmp_path, monkeypatch, code):
    """A read-only mount, a folder without permission or a full disk (simulated: root writes anywhere)."""
    def refuse(*a, **kw):
        raise OSError(code, os.strerror(code), str(tmp_path))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputDirError) as info:
        check_writable_dir(tmp_path, "--output_dir")
    assert info.value.errno == code
    assert str(info.value) == (f"--output_dir {tmp_path} is not writable ({os.strerror(code)}); choose a folder you "
                               "can write to or fix its permissions")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_dir_is_refused_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="is not writable"):
            check_writable_dir(ro)
        with pytest.raises(OutputDirError, match="cannot be created"):
            check_writable_dir(ro / "sub")
    finally:
        ro.chmod(0o700)


def test_a_stored_config_with_earlier_key_names_is_read_under_the_new_ones():
    """A checkpoint from before ``threshold`` (the mode) became ``threshold_mode`` is still checked."""
    from oodfast.train.checkpoint import check_same_run, stored_config

    assert stored_config({"threshold": "online", "arch": "x"}) == {"threshold_mode": "online", "arch": "x"}
    assert stored_config(None) is None
    check_same_run({"threshold": "online"}, {"threshold_mode": "online"}, Path("c.pth"))
    with pytest.raises(ValueError, match="threshold_mode: 'fixed' in the run, 'online' now"):
        check_same_run({"threshold": "fixed"}, {"threshold_mode": "online"}, Path("c.pth"))
