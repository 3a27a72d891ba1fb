"""What the page tests share: run a Streamlit page on a suite folder, and read its plotly charts."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest


def run_page(page: Path, suite: Path) -> AppTest:
    """The page run once on `suite` (given as the `suite` query parameter), with no exception raised."""
    at = AppTest.from_file(str(page), default_timeout=120)
    at.query_params["suite"] = str(suite)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def title(spec: dict) -> str:
    return spec["layout"].get("title", {}).get("text", "")


def array(v) -> list[float]:
    """A plotly spec's array, which may come as a typed array ({"dtype": ..., "bdata": base64})."""
    return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist() if isinstance(v, dict) else list(v)
