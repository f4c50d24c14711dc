"""Every Triton kernel in kernels/, compiled by the real Triton compiler for sm_90 and sm_80, no GPU needed.

Triton's interpreter (TRITON_INTERPRET=1, what the equivalence tests run on a CPU) accepts code the
compiler rejects (non-constexpr globals in @jit code, some dtypes) and says nothing about registers.
Here each kernel is compiled, at every configuration its launcher can choose, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; the PTX is then assembled by the
``ptxas`` the triton wheel ships (with the flags Triton itself passes) and ``ptxas -v`` gives the
registers, spill stores / loads, stack and shared memory of each kernel. A case fails on a compile
error, on any spill, and on shared memory above the architecture's per-block limit.

The configurations come from the launchers' own pure config functions (``launch_config`` in each kernel
module), evaluated over a sweep of shapes and device properties: a launcher change is tested here
without editing this file.

Compiling needs the real ``@triton.jit`` functions, but on a CPU host tests/conftest.py sets
TRITON_INTERPRET=1 before the kernels are imported, so the compiles run in one subprocess (this file
as a script, TRITON_INTERPRET unset), with a process per core. Triton's on-disk cache
(~/.triton/cache) makes a rerun fast; in one pytest run the results are computed once.

As a script, ``python tests/kernels/test_compile.py`` prints the table (``--json PATH`` also writes it).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the real compiler, before any kernel module is imported
    os.environ.pop("TRITON_INTERPRET", None)

import argparse
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (90, 80)
#: Shared memory a block may use (opt-in maximum), per compute capability.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
#: Device properties the launchers' config functions are evaluated for: H100/H200 (132 SMs),
#: A100 (108 SMs) and a small part (a laptop/workstation GPU), so SM-count-dependent choices vary.
DEVICES = ({"name": "H200", "cc": 90, "sm_count": 132}, {"name": "A100", "cc": 80, "sm_count": 108},
           {"name": "small", "cc": 80, "sm_count": 24})


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel compile: ``kernel`` is "module:function"; ``args`` maps every non-constexpr parameter
    to a pointer type ("*fp32", ...) or a representative int (specialised as Triton's launcher would)."""

    label: str
    kernel: str
    args: tuple[tuple[str, object], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    cc: int

    @property
    def id(self) -> str:
        return f"sm{self.cc}-{self.label}"


def make_case(label: str, kernel: str, args: dict, config, cc: int) -> Case:
    """A Case from a launcher's config (``constexprs``, ``num_warps``, ``num_stages``)."""
    return Case(label, kernel, tuple(args.items()), tuple(sorted(config.constexprs.items())),
                config.num_warps, config.num_stages, cc)


# ------------------------------------------------------------------------------------------------
# The configurations, from the launchers' config functions
# ------------------------------------------------------------------------------------------------

_TRITON_TYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
#: Representative runtime ints: multiples of 16 (what real shapes give, specialised as divisible),
#: and for ring_copy odd ones too (no divisibility: per-element masks, the costlier code; crops are
#: the one size users vary freely). Scores and kNN use the aligned shapes only (embedding widths are
#: multiples of 16), to keep the compile count down.
INT_SHAPES = {"aligned": dict(V=2, B=1024, D=2048, R=255, E=3 * 224 * 224),
              "odd": dict(V=3, B=1001, D=2047, R=257, E=3 * 7 * 9)}


def _label(name: str, cfg, *extra: str) -> str:
    parts = [*extra, *(f"{k}={v}" for k, v in sorted(cfg.constexprs.items())), f"w{cfg.num_warps}", f"s{cfg.num_stages}"]
    return f"{name}[{','.join(parts)}]"


def rare_enqueue_cases() -> list[Case]:
    import torch

    from oodfast.kernels import rare_enqueue as m

    cases = {}
    # B: 1, 64, 1024 (the design point's batch), 4096, 65536; D: 1 (score) / 2048; V = 2 (two global crops);
    # R: the calibration set's rank (255: 256 images, 1023: 1024 images) or 0.
    for dev in DEVICES:
        for metric_name, metric in m.METRICS.items():
            for has_ring in (True, False):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    for B in (1, 64, 1024, 4096, 65536):
                        for R in ((255, 1023) if metric == m.MAHALANOBIS else (0,)):
                            D = 1 if metric == m.SCORE else 2048
                            xt = _TRITON_TYPE[str(dtype)]
                            for cfg in m.launch_config(metric, has_ring, 2, B, D, R, dtype, dev["sm_count"], "cuda"):
                                for ints_name, ints in list(INT_SHAPES.items())[:1]:
                                    v, b, r = ints["V"], ints["B"], ints["R"]
                                    d = 1 if metric == m.SCORE else ints["D"]
                                    if cfg.kernel == "_rare_combine_kernel":
                                        args = dict(ws_ptr="*fp32", scores_ptr="*fp32", V=v, B=b, n_split=5)
                                        label = _label("rare_combine", cfg, ints_name)
                                    else:
                                        args = dict(
                                            x_ptr="*" + xt, stride_v=b * d, stride_b=d, center_ptr="*fp32",
                                            proj_ptr="*fp32", coef_ptr="*fp32", alpha_ptr="*fp32",
                                            threshold_ptr="*fp32", ids_ptr="*i64", step_ptr="*i64",
                                            scores_ptr="*fp32", slots_ptr="*i32" if has_ring else "*fp32",
                                            ring_ids_ptr="*i64", ring_scores_ptr="*fp32", ring_steps_ptr="*i64",
                                            state_ptr="*i64", scratch_ptr="*i32" if has_ring else "*i64",
                                            ws_ptr="*fp32", V=v, B=b, D=d, R=r if metric == m.MAHALANOBIS else 0,
                                            C=32, n_split=cfg.params["n_split"] if cfg.params["n_split"] > 1 else 5)
                                        label = _label("rare_enqueue", cfg, metric_name, xt, ints_name)
                                    for cc in ARCHS:
                                        case = make_case(label, f"oodfast.kernels.rare_enqueue:{cfg.kernel}", args, cfg, cc)
                                        cases.setdefault(case.id, case)
    return list(cases.values())


def knn_score_cases() -> list[Case]:
    import torch

    from oodfast.kernels import knn_score as m

    cases = {}
    # x in the bank's dtype, and fp32 x against a bf16 bank (fp32 embeddings, the default bf16 bank).
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
              (torch.float32, torch.bfloat16)]
    for dev in DEVICES:
        for x_dtype, bank_dtype in dtypes:
            for k in range(1, 257):
                for B in (1, 1024, 65536):
                    for N in (1000, 1_000_000):
                        xt, bt = _TRITON_TYPE[str(x_dtype)], _TRITON_TYPE[str(bank_dtype)]
                        for cfg in m.launch_config(B, 2048, N, k, bank_dtype, dev["sm_count"]):
                            if cfg.kernel == "_knn_topk_kernel":
                                args = dict(x_ptr="*" + xt, bank_ptr="*" + bt, out_ptr="*fp32", ws_ptr="*fp32",
                                            B=1024, N=100_000, D=2048, k=k, rows_per_split=cfg.params["rows_per_split"],
                                            stride_xb=2048, stride_xd=1, stride_bn=2048, stride_bd=1, stride_out=1,
                                            write_partial=cfg.params["write_partial"])
                                label = _label("knn_topk", cfg, f"x={xt}", f"bank={bt}")
                            else:
                                args = dict(ws_ptr="*fp32", out_ptr="*fp32", B=1024, k=k, num_splits=7, stride_out=1)
                                label = _label("knn_merge", cfg)
                            for cc in ARCHS:
                                case = make_case(label, f"oodfast.kernels.knn_score:{cfg.kernel}", args, cfg, cc)
                                cases.setdefault(case.id, case)
    return list(cases.values())


def ring_copy_cases() -> list[Case]:
    import torch

    from oodfast.kernels import ring_copy as m

    cases = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for ints_name, ints in INT_SHAPES.items():
            cfg = m.launch_config(ints["B"], 8, dtype)
            t, e, rows = "*" + _TRITON_TYPE[str(dtype)], ints["E"], ints["B"] + 32
            args = dict(slots_ptr="*i32", src0_ptr=t, dst0_ptr=t, src0_sv=rows * e, src0_sb=e, dst0_sv=rows * e,
                        dst0_sc=e, V0=2, E0=e, src1_ptr=t, dst1_ptr=t, src1_sv=rows * e, src1_sb=e,
                        dst1_sv=rows * e, dst1_sc=e, E1=e)
            for cc in ARCHS:
                case = make_case(_label("ring_copy", cfg, t[1:], ints_name), "oodfast.kernels.ring_copy:_ring_copy_kernel",
                                 args, cfg, cc)
                cases.setdefault(case.id, case)
    return list(cases.values())


@functools.cache
def all_cases() -> list[Case]:
    return rare_enqueue_cases() + knn_score_cases() + ring_copy_cases()


# ------------------------------------------------------------------------------------------------
# Compile + ptxas (runs in the subprocess: TRITON_INTERPRET unset)
# ------------------------------------------------------------------------------------------------


def _ptxas() -> tuple[str, list[str]]:
    """The wheel's ptxas and the flags Triton's own make_cubin passes (besides --gpu-name)."""
    import triton
    from triton.backends.nvidia import compiler as nv

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    flags = ["-lineinfo", "-v"]
    if "regAllocOptLevel" in inspect.getsource(nv.CUDABackend.make_cubin):  # triton >= 3.7 (ptxas 13 workaround)
        flags.append("--regAllocOptLevel=2")
    return str(path), flags


def signature_of(fn, case: Case) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, specialising ints as Triton's launcher does:
    1 -> constexpr, a multiple of 16 -> tt.divisibility=16; pointers 16-byte aligned (the caching
    allocator's); parameters marked do_not_specialize stay plain ints."""
    args, constexprs = dict(case.args), dict(case.constexprs)
    signature, attrs = {}, {}
    missing = set(fn.arg_names) - set(args) - set(constexprs)
    if missing:
        raise ValueError(f"{case.id}: no value for {sorted(missing)}")
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = args[name]
        no_spec = getattr(fn.params[i], "do_not_specialize", False)
        if isinstance(v, str):
            signature[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif no_spec:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif v == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_log(ptxas: str, flags: list[str], ptx: str) -> str:
    """``ptxas -v`` output for ``ptx``, cached next to Triton's own cache (keyed by ptxas, flags, PTX):
    Triton's cache makes a repeated compile instant, this makes the repeated ptxas run instant too."""
    from triton import knobs

    key = hashlib.sha256("\0".join([ptxas, *flags, ptx]).encode()).hexdigest()
    cache = Path(knobs.cache.dir) / "oodfast-ptxas" / f"{key}.log"
    if cache.exists():
        return cache.read_text()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ptx)
        r = subprocess.run([ptxas, *flags, str(Path(d) / "k.ptx"), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {log}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(log)
    tmp.replace(cache)
    return log


def compile_case(case: Case) -> dict:
    """Compile ``case``; figures from ptxas -v (smem from Triton's metadata: it is dynamic shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = dataclasses.asdict(case) | {"id": case.id, "error": None}
    t0 = time.perf_counter()
    try:
        module, name = case.kernel.split(":")
        fn = getattr(importlib.import_module(module), name)
        signature, constexprs, attrs = signature_of(fn, case)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", case.cc, 32),
                           options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        ptxas, flags = _ptxas()
        arch = f"sm_{case.cc}a" if case.cc >= 90 else f"sm_{case.cc}"
        log = _ptxas_log(ptxas, [*flags, f"--gpu-name={arch}"], k.asm["ptx"])
        for key, rx in _PTXAS_RE.items():
            m = rx.search(log)
            out[key] = int(m.group(1)) if m else None
        out["smem"] = int(k.metadata.shared)
    except Exception as e:  # reported per case; the test fails on it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().strip("^")]
        out["error"] = f"{type(e).__name__}: {' | '.join(lines[:1] + lines[-2:])}"[:400]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def compile_all(cases: list[Case], jobs: int | None = None) -> list[dict]:
    os.environ.pop("TRITON_INTERPRET", None)
    jobs = jobs or os.cpu_count() or 1
    # Slowest first (knn topk), so the pool does not end on one long compile.
    order = sorted(range(len(cases)), key=lambda i: "topk" not in cases[i].label)
    with ProcessPoolExecutor(jobs) as pool:
        results = dict(zip(order, pool.map(compile_case, [cases[i] for i in order], chunksize=1)))
    return [results[i] for i in range(len(cases))]


def verdict(r: dict) -> str:
    """Empty when the figures are acceptable, else why not."""
    if r["error"]:
        return r["error"]
    why = []
    if r["spill_st"] or r["spill_ld"]:
        why.append(f"spills {r['spill_st']} B stores / {r['spill_ld']} B loads")
    if r["smem"] > SMEM_LIMIT[r["cc"]]:
        why.append(f"shared memory {r['smem']} B > {SMEM_LIMIT[r['cc']]} B")
    return "; ".join(why)


def table(results: list[dict]) -> str:
    rows = ["| kernel / config | arch | regs | spill st/ld B | stack B | smem B | s | verdict |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r["label"], -r["cc"])):
        if r["error"]:
            rows.append(f"| {r['label']} | sm_{r['cc']} | | | | | {r['seconds']} | ERROR {r['error']} |")
        else:
            rows.append(f"| {r['label']} | sm_{r['cc']} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | "
                        f"{r['stack']} | {r['smem']} | {r['seconds']} | {verdict(r) or 'ok'} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# pytest
# ------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script needs no pytest
    pytest = None

if pytest is not None and __name__ != "__main__":
    _CASES = all_cases()

    @pytest.fixture(scope="session")
    def compiled(tmp_path_factory) -> dict[str, dict]:
        """Every case compiled once per pytest run, in a subprocess without TRITON_INTERPRET."""
        out = tmp_path_factory.mktemp("compile") / "results.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--json", str(out), "--quiet"], env=env,
                           capture_output=True, text=True, timeout=1800)
        if r.returncode not in (0, 1):  # 1: some case failed, reported per case below
            raise RuntimeError(f"compile subprocess failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        results = json.loads(out.read_text())
        print(f"\n{len(results)} kernel compiles in {time.perf_counter() - t0:.0f} s\n{table(results)}")
        return {r["id"]: r for r in results}

    def test_cases_cover_every_kernel():
        """Every @triton.jit kernel entry point of kernels/ is compiled here."""
        import glob

        kernels_dir = Path(__file__).resolve().parents[2] / "kernels"
        defined = set()
        for path in glob.glob(str(kernels_dir / "*.py")):
            src = Path(path).read_text()
            for m in re.finditer(r"@triton\.jit\s*\ndef (_\w+_kernel)\(", src):
                defined.add(f"oodfast.kernels.{Path(path).stem}:{m.group(1)}")
        assert defined and defined <= {c.kernel for c in _CASES}, defined - {c.kernel for c in _CASES}

    def test_dense_position_views_compile_as_swept_configurations():
        """Dense scoring (oodfast.dense) passes a channels_last map's [P, B, D] view (strides (D, P*D, 1))
        to rare_enqueue and its [B*P, D] rows to knn_score: no kernel change, and every launch those
        shapes choose is a configuration compiled above. Their runtime strides specialise as the swept
        ones do (Triton keys ints on == 1 and % 16: D and P*D are multiples of 16 for real widths)."""
        import torch

        from oodfast.kernels import knn_score as knn
        from oodfast.kernels import rare_enqueue as m

        def key(kernel, cfg):
            return kernel, tuple(sorted(cfg.constexprs.items())), cfg.num_warps, cfg.num_stages

        swept = {(c.kernel, c.constexprs, c.num_warps, c.num_stages) for c in _CASES}
        # P positions x B images x D channels: 14x14 (layer3 / ViT-S/16 at 224), 7x7, 28x28; D of
        # resnet18/50 layer2-4 and ViTs.
        shapes = [(196, 32, 256), (196, 32, 1024), (49, 256, 2048), (784, 8, 512), (196, 1, 384)]
        missing = set()
        for dev in DEVICES:
            for P, B, D in shapes:
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    for metric in (m.EUCLIDEAN, m.COSINE, m.MAHALANOBIS):
                        for R in ((255, 1023) if metric == m.MAHALANOBIS else (0,)):
                            for ring in (True, False):
                                for cfg in m.launch_config(metric, ring, P, B, D, R, dtype, dev["sm_count"], "cuda"):
                                    missing.add(key(f"oodfast.kernels.rare_enqueue:{cfg.kernel}", cfg))
                    for bank in ((torch.float32, torch.bfloat16) if dtype == torch.float32 else (dtype,)):
                        for cfg in knn.launch_config(B * P, D, 4096, 50, bank, dev["sm_count"]):
                            missing.add(key(f"oodfast.kernels.knn_score:{cfg.kernel}", cfg))
        missing -= swept
        assert not missing, f"dense shapes launch configurations that are not compiled here: {sorted(missing)[:3]}"

    @pytest.mark.slow
    @pytest.mark.parametrize("case", _CASES, ids=[c.id for c in _CASES])
    def test_compiles_without_spills(case, compiled, record_property):
        r = compiled[case.id]
        for key in ("regs", "spill_st", "spill_ld", "stack", "smem"):
            record_property(key, r.get(key))
        assert not verdict(r), f"{case.id}: {verdict(r)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per core)")
    p.add_argument("--filter", default="", help="only cases whose id matches this regular expression")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    cases = [c for c in all_cases() if re.search(a.filter, c.id)]
    t0 = time.perf_counter()
    results = compile_all(cases, a.jobs)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if not a.quiet:
        print(table(results))
        bad = [r for r in results if verdict(r)]
        print(f"\n{len(results)} compiles, {len(bad)} failing, {time.perf_counter() - t0:.0f} s "
              f"(triton {__import__('triton').__version__})")
    return 1 if any(verdict(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
