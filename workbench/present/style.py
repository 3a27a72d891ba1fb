"""Paper style and export for the workbench's plotly figures.

Why a module of its own: the app, the paper-figure scripts and the HTML report must show the *same*
figure, and a reader of the printed paper may see it in greyscale or with a colour-vision
deficiency. So series are told apart three ways at once (colour from the Okabe-Ito palette, marker
symbol, dash pattern), assigned by series name so a series keeps its look across facets and
figures. Export goes through kaleido (needs a Chromium); the HTML report does not, so a machine
without a browser can still produce a complete, offline-readable report.
"""
from __future__ import annotations

import contextlib
import html
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from workbench.core.env import offline
from workbench.core.errors import WorkbenchError
from workbench.core.files import write_text

def interval_bars(y: Iterable, lo: Iterable, hi: Iterable, **style: object) -> dict:
    """Plotly asymmetric error bars from rates and their interval bounds (Series or lists, matched
    by position); a missing bound draws no bar."""
    y = pd.Series(list(y), dtype=float)
    lo, hi = pd.Series(list(lo), dtype=float), pd.Series(list(hi), dtype=float)
    return dict(type="data", symmetric=False, array=(hi - y).clip(lower=0).fillna(0).tolist(),
                arrayminus=(y - lo).clip(lower=0).fillna(0).tolist(), **style)


# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
PALETTE: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
                            "#000000", "#F0E442")
# 11 symbols against 6 dashes and 8 colours: coprime lengths, so the first 66 series all differ
# in symbol+dash (greyscale) and the first 88 in symbol+colour.
SYMBOLS: tuple[str, ...] = ("circle", "square", "diamond", "triangle-up", "x", "triangle-down",
                            "cross", "star", "hexagon", "pentagon", "circle-open")
DASHES: tuple[str, ...] = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
FONT = "Liberation Sans, Arial, Helvetica, DejaVu Sans, sans-serif"
#: Put this in a trace's `meta` to keep the colours a builder chose (e.g. lineage roles, edges).
KEEP = "workbench:keep-style"
FORMATS = ("pdf", "svg", "png")

Content = Union[go.Figure, pd.DataFrame, str]


def series_style(i: int) -> dict[str, str]:
    """The i-th series' look: colour, marker symbol and dash all change together."""
    return {"color": PALETTE[i % len(PALETTE)], "symbol": SYMBOLS[i % len(SYMBOLS)],
            "dash": DASHES[i % len(DASHES)]}


def _styleable(trace: object) -> bool:
    return getattr(trace, "type", None) == "scatter" and getattr(trace, "meta", None) != KEEP


def distinguish(fig: go.Figure) -> go.Figure:
    """Give each named series (by legend group, else name) its own colour + symbol + dash, in place.

    The same series name in two facets gets the same look, so one legend entry serves both.
    Traces marked with `meta=KEEP` and non-scatter traces (bars, heatmaps) are left alone.
    """
    seen: dict[str, int] = {}
    for trace in fig.data:
        if not _styleable(trace):
            continue
        key = trace.legendgroup or trace.name or ""
        i = seen.setdefault(key, len(seen))
        s = series_style(i)
        trace.update(marker=dict(color=s["color"], symbol=s["symbol"], size=8,
                                 line=dict(width=0.5, color="#333333")),
                     line=dict(color=s["color"], dash=s["dash"], width=1.5))
        if trace.error_y is not None and trace.error_y.array is not None:
            trace.update(error_y=dict(color=s["color"], thickness=1.2, width=3))
    return fig


def paper_template() -> go.layout.Template:
    """White, thin black axes, light grid, one clean font: legible printed small and in greyscale."""
    axis = dict(showline=True, linecolor="black", linewidth=1, mirror=True, ticks="outside",
                tickcolor="black", showgrid=True, gridcolor="#E5E5E5", zeroline=False,
                title=dict(standoff=6))
    return go.layout.Template(layout=dict(
        font=dict(family=FONT, size=12, color="black"),
        paper_bgcolor="white", plot_bgcolor="white", colorway=list(PALETTE),
        xaxis=axis, yaxis=axis,
        legend=dict(bgcolor="rgba(255,255,255,0.85)", bordercolor="#BBBBBB", borderwidth=0.5),
        margin=dict(l=60, r=20, t=50, b=60),
        hoverlabel=dict(font=dict(family=FONT)),
    ))


def paper_style(fig: go.Figure, width: int | None = None, height: int | None = None) -> go.Figure:
    """A styled copy of `fig` (the original, perhaps cached by the app, is not touched)."""
    out = go.Figure(fig)
    distinguish(out)
    # Explicit colours as well as the template: viewers that swap templates keep a white page.
    out.update_layout(template=paper_template(), paper_bgcolor="white", plot_bgcolor="white",
                      font=dict(family=FONT, color="black"))
    # Facet titles are annotations; they should use the paper font too.
    out.update_annotations(font=dict(family=FONT, size=12, color="black"))
    if width or height:
        out.update_layout(width=width, height=height)
    return out


def chromium_path() -> str | None:
    """The Chromium kaleido would use (BROWSER_PATH, then PATH and the usual places), or None.

    Checked before starting kaleido so a missing browser is a clear message, not a stack trace
    from a browser-control thread.
    """
    try:
        from choreographer.browsers.chromium import Chromium
        return Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - any failure to look is "not found", with a fallback look
        return next((p for n in ("chromium", "chromium-browser", "google-chrome")
                     if (p := shutil.which(n))), None)


_NO_CHROMIUM = ("figure export needs a Chromium browser and none was found; install it with "
                "`apt-get update && apt-get install -y chromium` (as root), or set BROWSER_PATH to a "
                "Chrome/Chromium executable. The HTML report (figures.html_report) works without one.")


@contextlib.contextmanager
def _quiet_browser_pipe() -> Iterator[None]:
    """choreographer logs a harmless JSON decoding traceback when the browser closes; hide it."""
    log = logging.getLogger("choreographer.channels.pipe")
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


@contextlib.contextmanager
def one_browser() -> Iterator[None]:
    """Every figure exported inside this block goes through one Chromium, started once: several
    paper scripts in a row (`workbench figures`) then pay its start-up once, not once each. Without
    a Chromium it does nothing (the first export says what to install)."""
    import warnings

    import kaleido

    if chromium_path() is None:
        yield
        return
    with _quiet_browser_pipe(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored if using a server")
        kaleido.start_sync_server(silence_warnings=True)
        try:
            yield
        finally:
            kaleido.stop_sync_server(silence_warnings=True)


def export_many(items: Sequence[tuple[go.Figure, str | Path]], formats: Sequence[str] = FORMATS,
                scale: float = 2.0) -> list[Path]:
    """Write `stem.<fmt>` for every (figure, stem) and format with ONE browser start.

    Starting Chromium costs seconds; a paper script with several figures should call this once.
    Files are written under temporary names and renamed only after every image has succeeded, so
    a half-written figure never sits under its final name. Sizes come from each figure's layout
    (plotly's batch writer would otherwise ignore them).
    """
    formats = [f.lower().lstrip(".") for f in formats]
    bad = sorted(set(formats) - {"pdf", "svg", "png", "jpg", "jpeg", "webp"})
    if bad:
        raise WorkbenchError(f"cannot export figures as {bad}; use pdf, svg or png")
    if not formats or not items:
        return []
    if chromium_path() is None:
        raise WorkbenchError(_NO_CHROMIUM)
    jobs: list[tuple[go.Figure, Path, Path]] = []  # (figure, temp path, final path)
    tmpdirs: list[Path] = []
    try:
        for fig, stem in items:
            stem = Path(stem)
            stem.parent.mkdir(parents=True, exist_ok=True)
            tmpdirs.append(Path(tempfile.mkdtemp(prefix=f".{stem.name}.tmp-", dir=stem.parent)))
            jobs += [(fig, tmpdirs[-1] / f"{stem.name}.{fmt}", stem.with_name(f"{stem.name}.{fmt}"))
                     for fmt in formats]
        figs = [j[0] for j in jobs]
        try:
            with _quiet_browser_pipe():
                pio.write_images(figs, [j[1] for j in jobs], scale=scale,
                                 width=[f.layout.width or 800 for f in figs],
                                 height=[f.layout.height or 500 for f in figs])
        except Exception as exc:  # noqa: BLE001 - translated into a message the user can act on
            if _is_chrome_missing(exc):
                raise WorkbenchError(_NO_CHROMIUM) from exc
            raise WorkbenchError(f"exporting {len(items)} figure(s) as {formats} failed: {exc}. "
                                 "If Chromium cannot start, try `chromium --headless --version`."
                                 ) from exc
        for _, tmp, final in jobs:
            if not tmp.exists() or tmp.stat().st_size == 0:
                raise WorkbenchError(f"kaleido wrote nothing for {final.name}; export it again")
        for _, tmp, final in jobs:
            os.replace(tmp, final)
        return [final for _, _, final in jobs]
    finally:
        for d in tmpdirs:
            shutil.rmtree(d, ignore_errors=True)


def export(fig: go.Figure, stem: str | Path, formats: Sequence[str] = FORMATS,
           width: int | None = None, height: int | None = None, scale: float = 2.0) -> list[Path]:
    """Write `stem.pdf`, `stem.svg`, `stem.png` (or `formats`) for one figure; return the paths."""
    if width or height:
        fig = go.Figure(fig).update_layout(width=width or fig.layout.width,
                                           height=height or fig.layout.height)
    return export_many([(fig, stem)], formats, scale)


def _is_chrome_missing(exc: BaseException) -> bool:
    try:
        from kaleido.errors import ChromeNotFoundError
    except ImportError:  # pragma: no cover - kaleido always ships it
        return False
    return isinstance(exc, ChromeNotFoundError) or (
        isinstance(exc, RuntimeError) and "requires Google Chrome" in str(exc))


_CSS = """
body{font-family:Liberation Sans,Arial,Helvetica,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#111}
h1{font-size:1.6em;border-bottom:1px solid #ccc;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:2em}
table.wb{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.wb th,table.wb td{padding:.25em .6em;text-align:right;border-bottom:1px solid #e0e0e0}
table.wb thead th{border-bottom:2px solid #333}
table.wb td:first-child,table.wb th:first-child{text-align:left}
p.meta{color:#666;font-size:.85em}
""".strip()


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "\n".join(f"<p>{html.escape(p)}</p>" for p in parts)


def html_report(sections: Iterable[tuple[str, Content]], path: str | Path, title: str) -> Path:
    """One self-contained HTML file: plotly.js inline (once), tables as HTML, text as paragraphs.

    Needs neither a browser nor kaleido to write, and nothing from the network to read, so a
    report can be made on a headless box and mailed around.
    """
    path = Path(path)
    body: list[str] = []
    plotly_included = False
    for i, (heading, content) in enumerate(sections):
        body.append(f"<section id=\"s{i}\"><h2>{html.escape(heading)}</h2>")
        if isinstance(content, go.Figure):
            body.append(content.to_html(full_html=False, include_plotlyjs=not plotly_included,
                                        include_mathjax=False, div_id=f"fig{i}",
                                        config={"displaylogo": False, "responsive": True}))
            plotly_included = True
        elif isinstance(content, pd.DataFrame):
            body.append(content.to_html(index=False, border=0, classes="wb", na_rep="",
                                        float_format=lambda x: f"{x:.3g}"))
        elif isinstance(content, str):
            body.append(_paragraphs(content))
        else:
            raise WorkbenchError(f"report section {heading!r} holds a {type(content).__name__}; "
                                 "give a plotly Figure, a pandas DataFrame or a string")
        body.append("</section>")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           f"<h1>{html.escape(title)}</h1><p class=\"meta\">Generated {created} by the workbench.</p>\n"
           + "\n".join(body) + "\n</body></html>\n")
    write_text(path, doc)
    return path


def _latex_escape(value: object) -> str:
    s = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
             "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
    return "".join(table.get(c, c) for c in s)


def booktabs(df: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """A booktabs LaTeX table without jinja2 (pandas' `to_latex` needs it)."""
    def cell(v: object) -> str:
        if isinstance(v, float) and not pd.isna(v):
            return _latex_escape(float_format.format(v))
        return _latex_escape(v)

    align = "".join("r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns)
    lines = [f"\\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(_latex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _to_latex(df: pd.DataFrame, float_format: str) -> str:
    try:
        import jinja2  # noqa: F401  (pandas' to_latex renders through jinja2)
    except ImportError:
        return booktabs(df, float_format)
    return df.to_latex(index=False, escape=True, na_rep="",
                       float_format=lambda x: float_format.format(x))


def table_outputs(df: pd.DataFrame, stem: str | Path, float_format: str = "{:.3f}",
                  display: pd.DataFrame | None = None) -> list[Path]:
    """`stem.csv` (full precision, for re-analysis) and `stem.tex` (booktabs, for the paper).

    `display`, if given, is what the LaTeX shows instead of `df` (e.g. "0.97 [0.91, 0.99]" cells
    in place of separate rate/lo/hi columns), so the paper table stays narrow while the CSV keeps
    every number.
    """
    stem = Path(stem)
    csv, tex = stem.with_name(f"{stem.name}.csv"), stem.with_name(f"{stem.name}.tex")
    write_text(csv, df.to_csv(index=False))
    write_text(tex, _to_latex(df if display is None else display, float_format))
    return [csv, tex]


def run_script(make: Callable[[], Sequence[Path]]) -> int:
    """The body of an `analyses/*.py` main: offline, run, print what was written; a WorkbenchError
    becomes its message and exit status 1 (no traceback), as in the CLI."""
    import sys


    offline()
    try:
        paths = make()
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0
