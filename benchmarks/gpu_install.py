"""Put oodfast on a machine's PYTHONPATH without touching its torch or triton (used by benchmarks/gpu.sh).

    python3 benchmarks/gpu_install.py record WHEEL_DIR    # here, after `pip wheel`: WHEEL_DIR/SOURCE.json
    python3 benchmarks/gpu_install.py install DEST        # there: oodfast importable from DEST; prints JSON

The package maps kernels/ -> oodfast.kernels and cli/ -> oodfast.cli (pyproject's package-dir), so the
repository root on PYTHONPATH does not give a working ``oodfast``. ``install`` uses the carried wheel
(``.whl/oodfast-*.whl``, built by benchmarks/build-gpu-wheel.sh) when its recorded source hash matches
this tree, with ``pip install --no-deps --no-index --target DEST``; otherwise (no wheel, or a wheel
built from other sources) it lays the listed packages out under DEST exactly as pyproject maps them.
Either way DEST holds only oodfast: the machine's torch, triton and torchvision stay as they are.
Standard library only (it runs before oodfast can be imported).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Each package pyproject lists -> its source folder, following ``package-dir`` as setuptools does."""
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = tool.get("package-dir", {})
    dirs = {}
    for package in tool["packages"]:
        parts = package.split(".")
        for i in range(len(parts), 0, -1):  # the longest mapped prefix decides
            prefix = ".".join(parts[:i])
            if prefix in mapping:
                dirs[package] = root / mapping[prefix] / Path(*parts[i:])
                break
        else:
            dirs[package] = root / Path(*parts)
    return dirs


def _files(folder: Path) -> list[Path]:
    """A package's own modules (not its subfolders, which are packages of their own or not installed)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".py")


def tree_hash(root: Path = ROOT) -> str:
    """sha256 over pyproject.toml and every module the wheel would hold, by installed path."""
    h = hashlib.sha256((root / "pyproject.toml").read_bytes())
    for package, folder in sorted(package_dirs(root).items()):
        for f in _files(folder):
            h.update(f"\0{package}/{f.name}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _git_sha(root: Path) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def record(wheel_dir: Path, root: Path = ROOT) -> dict:
    """Write WHEEL_DIR/SOURCE.json: the git SHA (``+dirty`` with uncommitted changes) and the tree hash."""
    info = {"git_sha": _git_sha(root), "tree_sha256": tree_hash(root),
            "wheels": [p.name for p in sorted(wheel_dir.glob("oodfast-*.whl"))]}
    (wheel_dir / "SOURCE.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def install(dest: Path, wheel_dir: Path, root: Path = ROOT) -> dict:
    """Make ``oodfast`` importable from ``dest``; returns how (``method``), the git SHA and both hashes."""
    tree = tree_hash(root)
    info: dict = {"tree_sha256": tree, "git_sha": _git_sha(root), "dest": str(dest)}
    wheels = sorted(wheel_dir.glob("oodfast-*.whl"))
    source = json.loads((wheel_dir / "SOURCE.json").read_text()) if (wheel_dir / "SOURCE.json").is_file() else {}
    if source.get("git_sha") and not info["git_sha"]:
        info["git_sha"] = source["git_sha"]  # the tree travels without .git: the SHA the wheel was built at
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if len(wheels) == 1 and source.get("tree_sha256") == tree:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                        "--disable-pip-version-check", "--target", str(dest), str(wheels[0])], check=True)
        info.update(method="wheel", wheel=wheels[0].name)
        return info
    if wheels:
        why = "several wheels" if len(wheels) > 1 else "a wheel built from other sources than this tree"
        info["wheel_skipped"] = f"{why} ({', '.join(w.name for w in wheels)}); rebuild with benchmarks/build-gpu-wheel.sh"
        if source.get("git_sha") and info["git_sha"] == source["git_sha"] and not _git_sha(root):
            info["git_sha"] = f"{source['git_sha']} (the wheel's; this tree differs from it)"
    for package, folder in package_dirs(root).items():
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in _files(folder):
            shutil.copy2(f, target / f.name)
    info["method"] = "source tree laid out as pyproject's package-dir"
    return info


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "record":
        print(json.dumps(record(Path(argv[1]))))
        return 0
    if len(argv) in (2, 3) and argv[0] == "install":
        wheel_dir = Path(argv[2]) if len(argv) == 3 else ROOT / ".whl"
        print(json.dumps(install(Path(argv[1]), wheel_dir)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
