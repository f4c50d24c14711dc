"""benchmarks/gpu.sh and its installer, checked without a GPU: valid bash, every section under its own
time cap, caps within the 8 minutes of one device call, every report under $OUT and few enough files for
the device tool to bring back; the installer gives an importable oodfast without touching torch.

Nothing here pretends to be a GPU: what needs one (the sections' bodies) runs on the device machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
INSTALL = ROOT / "benchmarks" / "gpu_install.py"
#: What one device call may run (its timeout_s is at most 10 minutes; the script is sized for 8).
BUDGET_S = 8 * 60
#: The device tool brings back at most 8 files from $OUT.
MAX_FILES = 8

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _text() -> str:
    return SCRIPT.read_text()


def _plan() -> tuple[dict[str, int], int, int]:
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=30, check=True)
    caps, grace, total = {}, None, None
    for line in out.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "section":
            caps[rest[0]] = int(rest[1])
        elif kind == "grace":
            grace = int(rest[0])
        elif kind == "total":
            total = int(rest[0])
    assert caps and grace is not None and total is not None, out.stdout
    return caps, grace, total


def test_gpu_sh_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_caps_fit_eight_minutes():
    caps, grace, total = _plan()
    assert set(caps) >= {"dali", "setup", "tests", "detect", "aug", "step"}
    assert all(c > 0 for c in caps.values()), caps
    # each section may run its cap, then its grace before SIGKILL
    assert sum(c + grace for c in caps.values()) <= total <= BUDGET_S, (caps, grace, total)


def test_every_section_runs_under_timeout():
    text = _text()
    caps, _, _ = _plan()
    for name in caps:
        assert re.search(rf"^section_{name}\(\) *\{{", text, re.M), f"section {name} has no section_{name}()"
    # sections are started in one place only, each as its own process under timeout with its cap
    calls = re.findall(r"^\s*(.*)--section \"\$s\"", text, re.M)
    assert calls == ['timeout -s INT -k "$GRACE" "$cap" bash "$self" '], calls
    assert re.search(r'^\s*"section_\$2"$', text, re.M)  # the --section entry runs just the named one
    bodies = re.sub(r"^section_\w+\(\).*?^\}$", "", text, flags=re.M | re.S)
    assert not re.search(r"^\s*section_\w+\b", bodies.split("# ---- the driver")[1], re.M), \
        "the driver calls a section outside timeout"


def test_reports_go_to_out_and_fit_what_comes_back():
    text = _text()
    assert re.search(r'^out=\$\{OUT:-\$\{1:-benchmarks/results\}\}$', text, re.M)  # $OUT first, then OUT_DIR
    assert re.search(r'^export STEM="\$out/', text, re.M)
    # the driver logs every section (all output, then its time and status) under STEM = $OUT/<gpu>-<date>
    assert re.search(r'^exec > >\(tee -a "\$STEM-gpu.log"\) 2>&1$', text, re.M)
    assert text.count('>>"$STEM-sections.tsv"') >= 3  # ran, skipped for DALI, skipped for time
    caps, _, _ = _plan()
    for name in set(caps) - {"dali"}:  # and each report section writes its report there (dali only installs)
        body = re.search(rf"^section_{name}\(\) *\{{(.*?)^\}}$|^section_{name}\(\) *\{{(.*?)\}}$", text,
                         re.M | re.S)
        assert body and "$STEM" in (body.group(1) or body.group(2)), f"section {name} writes nothing under $STEM"
    # the files under $OUT: the script's own, and the bench driver's (oodfast/bench/gpu.py)
    names = set(re.findall(r'"\$STEM(-[a-z-]+\.[a-z]+|\.[a-z]+)"', text))
    driver = (ROOT / "oodfast" / "bench" / "gpu.py").read_text()
    names |= set(re.findall(r'Path\(f"\{stem\}(-?[a-z-]*\.[a-z]+)"\)', driver))
    assert {".json", ".md", "-env.json", "-tests.txt", "-gpu.log", "-sections.tsv"} <= names, names
    assert len(names) <= MAX_FILES, sorted(names)
    work = re.search(r"^WORK=(\S+)", text, re.M).group(1)
    assert work.startswith("/tmp/"), work  # installs, caches and data stay out of $OUT


def test_pytest_no_tests_collected_is_a_failure():
    text = _text()
    tests = re.search(r"^section_tests\(\) *\{(.*?)^\}$", text, re.M | re.S).group(1)
    assert 'rc=${PIPESTATUS[0]}' in tests and 'return "$rc"' in tests  # pytest's own status, not tee's
    assert re.search(r"5\) echo .*a failure", tests)
    for path in ("tests/kernels", "tests/train/test_cuda.py", "tests/test_bench.py", "tests/kernels/test_compile.py"):
        assert path in tests


def test_no_gpu_is_a_clear_refusal(tmp_path: Path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "no GPU" in result.stderr
    assert not any((tmp_path / "out").iterdir())  # nothing half-written


def _install(dest: Path, wheel_dir: Path) -> dict:
    out = subprocess.run([sys.executable, str(INSTALL), "install", str(dest), str(wheel_dir)], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def _import_from(dest: Path) -> str:
    """Where a fresh interpreter, started in the repository root with only ``dest`` added, finds the kernels."""
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONSAFEPATH": "1", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", "import oodfast.kernels.rare_enqueue as m, oodfast.cli as c; "
                          "print(m.__file__); print(c.__file__)"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_install_lays_the_tree_out_as_pyproject_maps_it(tmp_path: Path):
    sys.path.insert(0, str(INSTALL.parent))
    try:
        import gpu_install
    finally:
        sys.path.remove(str(INSTALL.parent))
    dirs = gpu_install.package_dirs(ROOT)
    assert dirs["oodfast.kernels"] == ROOT / "kernels" and dirs["oodfast.cli"] == ROOT / "cli"
    assert dirs["oodfast.bench"] == ROOT / "oodfast" / "bench"
    info = _install(tmp_path / "site", tmp_path / "no-wheels")
    assert info["method"].startswith("source tree") and len(info["tree_sha256"]) == 64
    where = _import_from(tmp_path / "site")
    assert str(tmp_path / "site" / "oodfast" / "kernels" / "rare_enqueue.py") in where
    assert str(tmp_path / "site" / "oodfast" / "cli" / "__init__.py") in where
    assert not (tmp_path / "site" / "torch").exists()  # only oodfast goes there


def test_a_wheel_from_other_sources_is_not_installed(tmp_path: Path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "oodfast-0.1.0-py3-none-any.whl").write_bytes(b"not used")
    (wheels / "SOURCE.json").write_text(json.dumps({"git_sha": "abc123", "tree_sha256": "0" * 64}))
    info = _install(tmp_path / "site", wheels)
    assert info["method"].startswith("source tree") and "other sources" in info["wheel_skipped"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if head:  # a checkout's own SHA beats the wheel's record
        assert info["git_sha"].startswith(head)
    assert (tmp_path / "site" / "oodfast" / "kernels" / "rare_enqueue.py").is_file()
