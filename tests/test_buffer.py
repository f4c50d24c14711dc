"""RareRing: layouts, FIFO order, valid mask, checkpoints."""

from __future__ import annotations

import pytest
import torch

from oodfast.buffer import RareRing


def views(B, value=0.0):
    return [torch.full((B, 3, 8, 8), value + v) for v in range(2)] + [torch.full((B, 3, 4, 4), value + v) for v in range(2, 5)]


def test_tail_mode_serves_batch_and_ring_without_copies():
    ring = RareRing.for_multicrop(4, global_size=8, local_crops_number=3, local_size=4, batch_size=5)
    ring.stage(views(5, value=10.0))
    out = ring.views()
    assert [tuple(v.shape) for v in out] == [(9, 3, 8, 8)] * 2 + [(9, 3, 4, 4)] * 3
    assert out[0].data_ptr() == ring.storage[0].data_ptr()  # a view of the persistent tensor
    assert float(out[3][0, 0, 0, 0]) == 13.0

    slots = torch.tensor([-1, 3, -1, 0, -1], dtype=torch.int32)
    ring.write(slots)
    assert torch.equal(out[1][5 + 3], out[1][1]) and torch.equal(out[4][5 + 0], out[4][3])


def test_append_order_valid_mask_and_entries():
    ring = RareRing(3, [(1, (2,))])
    assert not ring.valid.any()
    for k in range(5):
        ring.append([torch.full((2,), float(k))], sample_id=k)
    assert ring.is_full() and ring.valid.all()
    assert [float(ring.entry(k)[0][0]) for k in range(3)] == [2.0, 3.0, 4.0]
    assert ring.ring_ids[ring.fifo_order()].tolist() == [2, 3, 4]
    ring.reset()
    assert int(ring.count) == 0 and not ring.valid.any()


def test_partial_ring_mixes_only_valid_entries_oldest_first():
    ring = RareRing(4, [(1, (2,)), (1, (1,))])
    ring.append([torch.tensor([1.0, 1.0]), torch.tensor([1.0])])
    ring.append([torch.tensor([2.0, 2.0]), torch.tensor([2.0])])
    assert ring.valid.tolist() == [True, True, False, False]
    mixed = ring.mixed([torch.zeros(3, 2), torch.zeros(3, 1)])
    assert mixed[0][3:, 0].tolist() == [1.0, 2.0] and mixed[1][3:, 0].tolist() == [1.0, 2.0]


def test_state_dict_keeps_the_ring_not_the_staging_rows():
    ring = RareRing.for_multicrop(2, global_size=8, local_crops_number=3, local_size=4, batch_size=64)
    for k in range(3):
        ring.append([v[0] for v in views(1, value=float(k))], sample_id=k, score=0.5 * k, step=k)
    state = ring.state_dict()
    assert state["crops0"].shape == (2, 2, 3, 8, 8) and state["crops1"].shape == (3, 2, 3, 4, 4)
    assert "scratch" not in state
    other = RareRing.for_multicrop(2, global_size=8, local_crops_number=3, local_size=4, batch_size=64)
    other.load_state_dict(state)
    assert torch.equal(other.ring_rows(0), ring.ring_rows(0)) and torch.equal(other.ring_rows(1), ring.ring_rows(1))
    assert torch.equal(other.state, ring.state) and other.ring_ids.tolist() == ring.ring_ids.tolist()
    wrong = RareRing.for_multicrop(3, global_size=8, local_crops_number=3, local_size=4)
    with pytest.raises(RuntimeError, match="capacity/views/crop size must match"):
        wrong.load_state_dict(state)


def test_bad_construction_and_views_are_refused():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        RareRing(0, [(1, (2,))])
    with pytest.raises(ValueError, match="one or two resolution groups"):
        RareRing(2, [(1, (2,))] * 3)
    ring = RareRing.for_multicrop(2, global_size=8, local_crops_number=3, local_size=4, batch_size=5)
    with pytest.raises(ValueError, match="expected 5 views"):
        ring.stage(views(5)[:4])
    with pytest.raises(ValueError, match="view 2 has crops of shape"):
        ring.stage(views(5)[:2] + [torch.zeros(5, 3, 5, 5)] * 3)
    with pytest.raises(RuntimeError, match="tail mode"):
        RareRing(2, [(1, (2,))]).views()


def test_rectangular_crops_are_stored_height_by_width():
    from oodfast.buffer import hw

    ring = RareRing.for_multicrop(2, global_size=(8, 16), local_crops_number=2, local_size=(4, 8), batch_size=3)
    assert ring.groups == [(2, (3, 8, 16)), (2, (3, 4, 8))]
    assert [tuple(s.shape) for s in ring.storage] == [(2, 5, 3, 8, 16), (2, 5, 3, 4, 8)]
    rows = [torch.full((3, 3, 8, 16), 1.0), torch.full((3, 3, 8, 16), 2.0), torch.zeros(3, 3, 4, 8), torch.zeros(3, 3, 4, 8)]
    ring.stage(rows)
    ring.write(torch.tensor([1, -1, -1], dtype=torch.int32))
    assert torch.equal(ring.ring_rows(0)[1, 1], torch.full((3, 8, 16), 2.0))
    assert tuple(ring.state_dict()["crops0"].shape) == (2, 2, 3, 8, 16)
    with pytest.raises(ValueError, match=r"shape \[3, 16, 8\], expected \[3, 8, 16\]"):
        ring.stage([torch.zeros(3, 3, 16, 8)] * 2 + rows[2:])  # width x height: refused
    assert hw(224) == (224, 224) and hw((512, 1024)) == (512, 1024) and hw([4, 8]) == (4, 8)
