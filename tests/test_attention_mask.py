"""attention_mask in dict batches and BatchEncodings: padded tokens reach neither the loss, nor the
activation statistics, nor the estimators, the adaptive fusion or the stages. A padded batch plans
exactly like its rows given without padding."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

from adaprune import CalibrationError, Pruner
from adaprune.scoring.calibration import as_batches
from families import FAMILIES, Shape, build

SHAPE = Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=24)
PAD = 0


def _rows():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, SHAPE.vocab, (n,), generator=generator) for n in (9, 6, 9, 4)]


def _padded(rows, left: bool = False):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    return ids, mask


def _by_length(rows):
    """The rows without padding, rows of one length batched together (as the calibration pass sees them)."""
    groups: dict[int, list] = {}
    for row in rows:
        groups.setdefault(len(row), []).append(row)
    return [torch.stack(group) for group in groups.values()]


def _scores(calibration, estimators, fusion="fixed"):
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=estimators, fusion=fusion, reconstruct=False, progress=False)
    return pruner.plan(calibration).scores


@pytest.mark.parametrize("estimators", [["taylor"], ["activation"], [{"name": "taylor", "order": 2}]])
@pytest.mark.parametrize("left", [False, True])
def test_padded_batch_plans_like_its_unpadded_rows(estimators, left):
    rows = _rows()
    ids, mask = _padded(rows, left)
    expected = _scores(_by_length(rows), estimators)
    assert _scores([{"input_ids": ids, "attention_mask": mask}], estimators) == expected
    assert _scores([BatchEncoding({"input_ids": ids, "attention_mask": mask})], estimators) == expected
    assert _scores(BatchEncoding({"input_ids": ids, "attention_mask": mask}), estimators) == expected
    # Padding that were scored as text would change the scores:
    assert _scores([ids], estimators) != expected


def test_adaptive_fusion_trains_on_unpadded_rows():
    rows = _rows()
    ids, mask = _padded(rows)
    kwargs = dict(estimators=["taylor"], fusion="adaptive")
    assert _scores([{"input_ids": ids, "attention_mask": mask}], **kwargs) == \
        _scores(_by_length(rows), **kwargs)


def test_as_batches_groups_rows_by_length():
    rows = _rows()
    ids, mask = _padded(rows)
    batches = as_batches([{"input_ids": ids, "attention_mask": mask}])
    assert sorted(b.shape[1] for b in batches for _ in range(b.shape[0])) == sorted(len(r) for r in rows)
    assert sum(int(b.ne(PAD).sum()) for b in batches) == int(mask.sum())


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[1, 0, 1, 1]]), "padding between its tokens"),
    (torch.tensor([[1, 2, 1, 1]]), "other than 0 and 1"),
    (torch.tensor([[1, 1, 1]]), "same shape"),
    (torch.tensor([[0, 0, 0, 1]]), "empty \\(or only padding\\)"),
])
def test_bad_masks_are_refused(mask, match):
    with pytest.raises(CalibrationError, match=match):
        as_batches([{"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": mask}])


def test_reconstruction_runs_on_rows_of_different_lengths():
    rows = _rows()
    ids, mask = _padded(rows)
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=["taylor"], fusion="fixed", progress=False)  # reconstruct on
    plan = pruner.plan([{"input_ids": ids, "attention_mask": mask}])
    pruner.apply(plan)
    assert plan.stages["reconstruct"]["rows"] == len(rows)
    assert plan.stages["reconstruct"]["tokens"] == int(mask.sum())
