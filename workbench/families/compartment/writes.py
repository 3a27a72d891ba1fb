"""Where did an update write? Its top singular directions set against the trigger's own directions.

The residual-writing matrices (attention output and MLP down projections) put an update's effect
into the residual stream along their left singular vectors; the `deltas` result keeps the top ones
per layer. A backdoor-insertion update that writes the trigger's representation should have a top
direction close to the trigger direction at that site (or to an SAE trigger latent's decoder row
downstream of it); a safety update that leaves the trigger alone should not. Cosines are compared
with what two random unit vectors in the same dimension give (the 99th percentile of |cos|,
about 2.58 / sqrt(d)).
"""
from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open

from workbench.core import results
from workbench.core.files import sha256_file


def sae_directions(suite: Any, backdoor: str, checkpoint: str, top: int = 5) -> tuple[dict[int, torch.Tensor], int | None, str]:
    """The decoder rows of the top trigger latents of the newest saved SAE search on `checkpoint`
    ({latent: unit row}), the layer whose resid_pre the SAE reads, and the search's key ("" if none)."""
    for res in results.list_results(suite.root, "sae_search"):
        cfg = res.provenance.get("config", {})
        if cfg.get("backdoor") != backdoor or res.provenance.get("checkpoint") != checkpoint:
            continue
        weights_sha = res.provenance.get("inputs", {}).get("sae")
        hook = str(res.provenance.get("hook", ""))
        if not hook.endswith("hook_resid_pre"):
            continue
        for sae in results.list_results(suite.root, "sae"):
            folder = sae.dir / "sae"
            prov = folder / "workbench.json"
            if not prov.is_file() or json.loads(prov.read_text()).get("weights_sha256") != weights_sha:
                continue
            if sha256_file(folder / "sae_weights.safetensors") != weights_sha:
                continue
            latents = res.table("trigger").sort_values("rank")["feature"].head(top).astype(int).tolist()
            with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as f:
                dec = f.get_tensor("W_dec").float()
            rows = {i: dec[i] / dec[i].norm().clamp_min(1e-12) for i in latents}
            return rows, int(hook.split(".")[1]), res.key
    return {}, None, ""


def writes(vectors: dict[str, torch.Tensor], trigger: dict[tuple[str, int], torch.Tensor],
           sae: dict[int, torch.Tensor], sae_layer: int | None) -> pd.DataFrame:
    """Per residual writer and singular direction: |cos| with the trigger direction at the site it
    writes, and the largest |cos| with an SAE trigger latent read downstream of it."""
    rows = []
    for key, vec in vectors.items():            # "L{layer}.{o|down}" -> [k, d_model]
        layer, module = int(key.split(".")[0][1:]), key.split(".")[1]
        site = ("resid_mid" if module == "o" else "resid_post", layer)
        t = trigger.get(site)
        d = vec.shape[1]
        for i, u in enumerate(vec):
            u = u / u.norm().clamp_min(1e-12)
            rec: dict[str, Any] = {"layer": layer, "module": module, "direction": i,
                                   "cos_trigger": abs(float(u @ t)) if t is not None else math.nan,
                                   "cos_random_99": 2.576 / math.sqrt(d)}
            if sae and sae_layer is not None and layer < sae_layer:
                cos = {j: abs(float(u @ r)) for j, r in sae.items()}
                best = max(cos, key=cos.get)
                rec.update({"cos_sae": cos[best], "sae_latent": best})
            rows.append(rec)
    return pd.DataFrame(rows)


def delta_vectors(res: results.Result) -> dict[str, torch.Tensor]:
    """The saved top write directions of a `deltas` result (none where every writer's update is zero)."""
    return {k: v for k, v in res.tensors().items() if k.startswith("L")} if res.provenance.get("tensors") else {}


