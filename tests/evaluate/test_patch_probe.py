"""The per-patch rare-class probe: labels per position from the masks, and a probe that reads a class
where the features carry it and is at chance where they do not."""

from __future__ import annotations

import pytest
import torch

from oodfast.data.classes import CLASS_IDS
from oodfast.evaluate.patch_probe import patch_probe, patch_probe_markdown, position_labels

PERSON, POLE, ROAD = CLASS_IDS["person"], CLASS_IDS["pole"], CLASS_IDS["road"]


def test_a_position_holds_a_class_when_any_pixel_of_its_cell_does():
    masks = torch.full((2, 8, 8), ROAD, dtype=torch.uint8)
    masks[0, 5, 6] = PERSON          # cell (2, 3) of a 4x4 grid
    masks[1, 0:2, 0:2] = 255         # ignored pixels hold nothing
    labels = position_labels(masks, (4, 4), [PERSON, ROAD])
    assert labels.shape == (2, 16, 2)
    brute = torch.zeros(2, 16, 2, dtype=torch.bool)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                cell = masks[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                brute[n, 4 * i + j] = torch.tensor([(cell == PERSON).any(), (cell == ROAD).any()])
    assert torch.equal(labels, brute)
    assert labels[0, 4 * 2 + 3, 0] and labels[:, :, 0].sum() == 1
    assert not labels[1, 0, 1]       # the all-ignore cell is not road


def scenes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [n, 8, 6, 6] and masks [n, 24, 24]: a person in some cells, whose positions carry +3 in
    channel 0; poles in others, which no channel carries."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.full((n, 24, 24), ROAD, dtype=torch.uint8)
    maps = torch.randn(n, 8, 6, 6, generator=g)
    for k in range(n):
        i, j = torch.randint(0, 6, (2,), generator=g).tolist()
        masks[k, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = PERSON
        maps[k, 0, i, j] += 3.0
        i, j = torch.randint(0, 6, (2,), generator=g).tolist()
        masks[k, 4 * i + 1, 4 * j + 1] = POLE
    return maps, masks


def test_the_probe_reads_a_class_its_features_carry_and_is_at_chance_on_one_they_do_not():
    (tr, trm), (te, tem) = scenes(200, 0), scenes(100, 1)
    out = patch_probe(tr, trm, te, tem, [PERSON, POLE])
    person, pole = out["classes"]["person"], out["classes"]["pole"]
    assert out["grid"] == [6, 6] and out["test_positions"] == 100 * 36
    assert person["auroc"] > 0.95 and person["recall"] > 0.9 and person["ap"] > 0.5
    assert 0.35 < pole["auroc"] < 0.65 and pole["ap"] < 0.1
    assert person["test_pos"] >= 100 and abs(person["prevalence"] - person["test_pos"] / 3600) < 1e-9
    text = patch_probe_markdown(out)
    assert "| person |" in text and "| macro |" in text


def test_a_class_absent_from_the_data_has_no_metrics_and_the_train_positions_are_capped():
    (tr, trm), (te, tem) = scenes(60, 0), scenes(20, 1)
    out = patch_probe(tr, trm, te, tem, [PERSON, CLASS_IDS["train"]], max_train_positions=500)
    assert out["classes"]["train"]["auroc"] is None and out["classes"]["train"]["test_pos"] == 0
    assert out["macro"]["auroc"] == out["classes"]["person"]["auroc"]
    # every person position kept, others drawn to fill the cap
    all_person = int(position_labels(trm, (6, 6), [PERSON]).sum())
    assert out["train_positions"] == 500 and out["classes"]["person"]["train_pos"] == all_person > 0


@pytest.mark.parametrize("bad, message", [
    (dict(train_maps=torch.randn(4, 8, 6)), "train_maps must be \\[N, D, h, w\\]"),
    (dict(test_maps=torch.randn(4, 5, 6, 6)), "differ in width or grid"),
    (dict(train_masks=torch.zeros(3, 24, 24, dtype=torch.uint8)), "train_masks must be \\[N, H, W\\] with N = 4"),
    (dict(test_maps=torch.full((4, 8, 6, 6), float("nan"))), "test_maps holds NaN"),
    (dict(class_ids=[]), "class_ids is empty"),
])
def test_bad_inputs_name_the_argument(bad, message):
    maps, masks = scenes(4, 0)
    args = dict(train_maps=maps, train_masks=masks, test_maps=maps, test_masks=masks, class_ids=[PERSON])
    with pytest.raises(ValueError, match=message):
        patch_probe(**{**args, **bad})
