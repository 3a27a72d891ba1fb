"""Across organisms: is where the early-layer effect sits a property of the recipe, or of one
training run? Per organism of a backdoor (other seeds, sizes, variants, insertion optimizers), the
share of its early-layer residual effect on the trigger tokens, on the readout and elsewhere, and
per recipe the spread of that share over its runs. Reads the saved `localisation` result only
(`workbench patch --organisms`, `workbench analyze`)."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

import common  # noqa: E402
import patching_view  # noqa: E402
from workbench.families.patching import index as px  # noqa: E402
from workbench.families.patching import stats as ps  # noqa: E402
from workbench.families.patching.figures import nodes as pp  # noqa: E402

common.setup("Across organisms")
st.title("Across organisms")
suite = common.suite_dir()
view = patching_view.choose(suite, checkpoint=False)
backdoor, metric, direction = view.backdoor, view.metric, view.direction
loc_res = px.localisation_result(suite, backdoor, metric, direction)
loc = common.table(loc_res, "organisms") if loc_res is not None else pd.DataFrame()
if len(loc) > 1:
    st.caption("Is where the early-layer effect sits a property of the recipe, or of one training run? Each bar is "
               "one organism of this backdoor (other seeds, sizes, variants, insertion optimizers) with its own "
               "early layers. A small gap vs the reference means a weak effect, whose shares say little.")
    with common.guard():
        st.plotly_chart(common.figure(loc_res.key, pp.localisation_figure, loc), width="stretch")
    st.subheader("Per recipe, over its training runs")
    recipes = common.table(loc_res, "recipes")
    for _, r in recipes.iterrows():  # the finding in full: the table's cell cuts it
        st.markdown(f"- **{'/'.join(str(r[c]) for c in ps.RECIPE_COLUMNS)}**, seeds {r['seeds']}: {r['finding']}")
    st.dataframe(recipes, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="percent")
                                for c in ("median", "min", "max", "past_layer0_median", "past_layer0_min",
                                          "past_layer0_max")})
    st.caption("A recipe is a preset, a data variant, an insertion optimizer and an answer format; its runs "
               "differ in seed. A run whose early layers are layer 0 alone is 100% by construction (at layer 0 "
               "only the trigger's tokens differ); the past_layer0 columns give the share over the other runs alone.")
    st.subheader("Per organism")
    st.dataframe(loc.drop(columns=["result"]), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="percent")
                                for c in ("on_trigger", "on_readout", "elsewhere")})
else:
    st.info(f"{len(loc)} organism of this backdoor has a saved localisation. To see whether its localisation "
            "holds across training runs, build more (`make seeds`, or `workbench suite build --out "
            f"{suite} --seeds 0 1 2 --sweep none`, or other --preset sizes) and run `workbench patch {suite} "
            f"--backdoor {backdoor} --organisms`.")
