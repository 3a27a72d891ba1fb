"""The dashboard's pages in headless Chromium: seconds from navigation to a settled page, warm,
against a bare Streamlit page served in the same run (the floor every page pays).

Starts the dashboard on the suite (`python -m streamlit run app/Home.py`, WORKBENCH_SUITE set, as
`workbench app` does) and a one-line `st.write("ok")` script, each on a free local port as its own
process group, and stops both by that group at the end. Drives Debian's /usr/bin/chromium through
Playwright. Each page gets one warm-up visit (the server's caches fill, the browser caches the
front-end code), then N measured visits, all in one tab, one page after another; a visit is
`page.goto(url)` and then a wait until the page has settled:
- the script run is over (the app root's `data-test-script-state` is `notRunning`, the websocket is
  connected, and the status widget does not show "Running"),
- no spinner (`stSpinner`) or skeleton (`stSkeleton`: a lazy element still loading) is visible,
- the number of drawn plotly charts (`.js-plotly-plot` with its svg) and of dataframes (grid
  drawn) and tables has not changed for 300 ms.
The time recorded runs from just before `goto` to the moment that last state began (the 300 ms
spent confirming it are not counted). A page that shows a Streamlit exception (`stException`), or
that has not settled after 60 s, stops the run with a message and exit code 1.

Last line: one JSON object: each page's median seconds, the slowest page, the floor, their ratio,
the pages over the 2 s goal (issue 26), and the repeats. `--quick` (under a minute) measures once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# page name -> URL path (Streamlit's page names: the file name without its number prefix)
# every page of the app, by its URL path (Streamlit names a page after its file, less the number)
PAGES = {"Home": "", **{p.stem.split("_", 1)[1]: p.stem.split("_", 1)[1]
                        for p in sorted((ROOT / "app" / "pages").glob("[0-9]*_*.py"))}}
GOAL_S = 2.0
STABLE_S = 0.3
TIMEOUT_S = 60.0
POLL_S = 0.03

# everything a settled page is judged by, read in one round trip
STATE_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const visible = (sel) => Array.from(document.querySelectorAll(sel)).some(
      (e) => e.offsetParent !== null || e.getClientRects().length > 0);
  const status = document.querySelector('[data-testid="stStatusWidget"]');
  const exc = document.querySelector('[data-testid="stException"]');
  return {
    script: app ? app.getAttribute('data-test-script-state') : null,
    connection: app ? app.getAttribute('data-test-connection-state') : null,
    running: !!(status && (/Running/i.test(status.innerText || '') ||
                           status.querySelector('[data-testid="stStatusWidgetRunningIcon"]'))),
    spinner: visible('[data-testid="stSpinner"]'),
    skeleton: visible('[data-testid="stSkeleton"]'),
    plots: Array.from(document.querySelectorAll('.js-plotly-plot')).filter(
               (e) => e.querySelector('svg')).length,
    frames: Array.from(document.querySelectorAll('[data-testid="stDataFrame"]')).filter(
               (e) => e.querySelector('canvas')).length
            + document.querySelectorAll('[data-testid="stTable"]').length,
    exception: exc ? exc.innerText.slice(0, 2000) : null,
  };
}"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`streamlit run SCRIPT` on a free port, in its own process group; `stop()` ends that group."""

    def __init__(self, script: Path, env: dict[str, str], label: str, logdir: Path):
        self.label, self.port = label, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"{label}.log"
        cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", "127.0.0.1",
               "--server.port", str(self.port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false"]
        with open(self.log_path, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.label} server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise BenchError(f"{self.label} server did not answer within {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this script started, nothing else
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class Visit:
    """One navigation of a tab, polled until the page has settled: seconds from just before `goto`
    to the start of the settled state, and what was drawn."""

    def __init__(self, tab, url: str, label: str):
        self.tab, self.url, self.label = tab, url, label
        self.errors: list[str] = []
        self.key, self.since, self.result = None, None, None
        self.tab.on("pageerror", self._on_error)
        self.t0 = time.perf_counter()
        tab.goto(url, wait_until="commit", timeout=TIMEOUT_S * 1e3)

    def _on_error(self, e) -> None:
        self.errors.append(str(e))

    def poll(self) -> dict | None:
        """The result once settled (then the visit is over), else None."""
        state = self.tab.evaluate(STATE_JS)
        now = time.perf_counter()
        if state["exception"]:
            raise BenchError(f"{self.label}: the page shows a Streamlit exception ({self.url}):\n{state['exception']}")
        done = (state["script"] == "notRunning" and state["connection"] == "CONNECTED"
                and not state["running"] and not state["spinner"] and not state["skeleton"])
        key = (state["plots"], state["frames"]) if done else None
        if key != self.key:
            self.key, self.since = key, now
        if key is not None and now - self.since >= STABLE_S:
            self.tab.remove_listener("pageerror", self._on_error)
            self.result = {"s": self.since - self.t0, "plots": key[0], "frames": key[1], "errors": self.errors}
            return self.result
        if now - self.t0 > TIMEOUT_S:
            raise BenchError(f"{self.label}: not settled after {TIMEOUT_S:.0f} s ({self.url}); last state {state}")
        return None


def settle(tab, url: str, label: str) -> dict:
    tab.goto("about:blank")  # leave the last visit (its websocket, its unload) outside the timing
    visit = Visit(tab, url, label)
    while (r := visit.poll()) is None:
        time.sleep(POLL_S)
    return r


def measure(tab, url: str, label: str, repeats: int) -> dict:
    """One warm-up visit (the server's caches fill, the browser caches the front-end code), then
    `repeats` measured ones."""
    warm = settle(tab, url, label)
    log(f"  {label:12s} warm-up {warm['s']:6.2f} s  ({warm['plots']} plots, {warm['frames']} dataframes)")
    runs = [settle(tab, url, label) for _ in range(repeats)]
    times = [r["s"] for r in runs]
    errors = sorted({e for r in [warm, *runs] for e in r["errors"]})
    for e in errors:
        log(f"  {label}: browser error: {e[:300]}")
    log(f"  {label:12s} measured " + " ".join(f"{t:.2f}" for t in times) + " s")
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "plots": runs[-1]["plots"], "frames": runs[-1]["frames"], "errors": errors, "times": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", default="suites/small")
    ap.add_argument("--quick", action="store_true", help="under a minute: one measured visit per page")
    ap.add_argument("--repeats", type=int, default=None, help="measured visits per page (default 3; 1 with --quick)")
    ap.add_argument("--pages", nargs="+", choices=list(PAGES), default=list(PAGES), metavar="PAGE",
                    help=f"pages to measure (default all: {' '.join(PAGES)})")
    a = ap.parse_args(argv)
    repeats = a.repeats or (1 if a.quick else 3)
    suite = Path(a.suite).resolve()
    if not (suite / "suite.json").is_file():
        ap.error(f"{suite} is not a suite (no suite.json); build one first (`workbench suite build`)")
    if not os.path.exists(CHROMIUM):
        ap.error(f"{CHROMIUM} not found (Debian's chromium package; `make chromium`)")
    from playwright.sync_api import sync_playwright

    # SIGTERM ends the run through `finally`, so the servers are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    servers: list[Server] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        tmp_path = Path(tmp)
        bare = tmp_path / "bare.py"
        bare.write_text('import streamlit as st\nst.write("ok")\n')
        try:
            app = Server(ROOT / "app" / "Home.py", {**env, "WORKBENCH_SUITE": str(suite)}, "app", tmp_path)
            servers.append(app)
            floor_server = Server(bare, env, "bare", tmp_path)
            servers.append(floor_server)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    app.wait_ready()
                    floor_server.wait_ready()
                    log(f"{suite}: app on {app.url}, bare page on {floor_server.url} "
                        f"(ready after {time.perf_counter() - t_start:.1f} s); {repeats} measured visit(s) per page "
                        f"after one warm-up; {os.cpu_count()} CPUs")
                    tab = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                    floor = measure(tab, floor_server.url + "/", "floor", repeats)
                    results = {name: measure(tab, f"{app.url}/{PAGES[name]}", name, repeats) for name in a.pages}
                finally:
                    browser.close()
        except BenchError as e:
            log(f"bench/app.py: {e}")
            for s in servers:
                if s.proc.poll() is not None or "Traceback" in s.tail():
                    log(f"--- {s.label} server log (tail) ---\n{s.tail()}")
            return 1
        finally:
            for s in servers:
                s.stop()

    print(f"{'page':12s} {'median s':>9s} {'min':>7s} {'max':>7s} {'plots':>6s} {'dataframes':>11s}")
    for name, r in [("(floor)", floor), *results.items()]:
        flag = "  > 2 s" if name != "(floor)" and r["median"] > GOAL_S else ""
        print(f"{name:12s} {r['median']:9.2f} {r['min']:7.2f} {r['max']:7.2f} {r['plots']:6d} {r['frames']:11d}{flag}")
    slowest = max(results, key=lambda n: results[n]["median"])
    x, y = results[slowest]["median"], floor["median"]
    print(f"slowest: {slowest} {x:.2f} s = {x / y:.1f} x the bare page's {y:.2f} s; "
          f"whole run {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"pages": {n: round(r["median"], 3) for n, r in results.items()},
                      "slowest_page": slowest, "slowest_page_s": round(x, 3), "floor_s": round(y, 3),
                      "slowest_over_floor": round(x / y, 2),
                      "pages_over_2s": [n for n, r in results.items() if r["median"] > GOAL_S],
                      "repeats": repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
