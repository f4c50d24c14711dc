"""The kernel tests' one comparison: allclose that says where and by how much it fails.

``assert_close(actual, expected, atol=..., rtol=...)`` passes when shapes and dtypes agree and every
entry has ``|actual - expected| <= atol + rtol * |expected|`` (integer and bool tensors: exactly
equal); NaN equals NaN only with ``equal_nan=True``. On a mismatch the message gives the number of bad
entries, the largest absolute and relative errors, the worst entry's index, and the first few bad
entries' values. Imported by the tests of this folder (pytest puts it on sys.path: no __init__.py).
"""

from __future__ import annotations

import torch

#: Bad entries whose values the message lists.
SHOWN = 5


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat //= n
    return tuple(reversed(out))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                 equal_nan: bool = False, msg: str = "") -> None:
    """Raise AssertionError unless ``actual`` matches ``expected`` within ``atol + rtol * |expected|``.

    Both tensors are compared on the CPU; integer and bool tensors must be equal (the tolerances are
    ignored). ``msg`` is prepended to the failure message (e.g. which output was compared).
    """
    head = f"{msg}: " if msg else ""
    assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor), \
        f"{head}expected two tensors, got {type(actual).__name__} and {type(expected).__name__}"
    assert actual.shape == expected.shape, f"{head}shape {list(actual.shape)} != expected {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{head}dtype {actual.dtype} != expected {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if not (a.is_floating_point() or a.is_complex()):
        atol = rtol = 0.0
        a, e = a.long(), e.long()
    else:
        a, e = a.double(), e.double()
    nan_a, nan_e = a.isnan(), e.isnan()
    diff = (a - e).abs()
    same_inf = (a == e) & a.isinf()  # inf - inf is NaN, but equal infinities are equal
    bad = ~same_inf & ~nan_a & ~nan_e & ~(diff <= atol + rtol * e.abs())
    bad |= (nan_a != nan_e) if equal_nan else (nan_a | nan_e)
    if not bad.any():
        return
    n_bad, flat = int(bad.sum()), bad.flatten().nonzero().flatten()
    err = torch.where(bad & ~nan_a & ~nan_e, diff, torch.zeros_like(diff)).flatten()
    worst = int(err.argmax()) if bool((err > 0).any()) else int(flat[0])
    rel = torch.where(err > 0, err / e.abs().flatten().clamp_min(torch.finfo(torch.float64).tiny), 0.0).max()
    shown = ", ".join(f"{_index(int(i), a.shape)}: {a.flatten()[i].item():.8g} vs {e.flatten()[i].item():.8g}"
                      for i in flat[:SHOWN])
    raise AssertionError(
        f"{head}{n_bad}/{bad.numel()} entries differ (atol={atol}, rtol={rtol}, equal_nan={equal_nan}); "
        f"max abs error {err.max().item():.3g}, max rel error {rel.item():.3g}, worst at "
        f"{_index(worst, a.shape)}: {a.flatten()[worst].item():.8g} vs {e.flatten()[worst].item():.8g}; "
        f"first bad (actual vs expected): {shown}")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, *, msg: str = "") -> None:
    """Exactly equal (shape, dtype and every value; NaN never equals NaN), with the same report."""
    assert_close(actual, expected, atol=0.0, rtol=0.0, msg=msg)
