# Two commands for a fresh clone: `make run` and `make test`. Both (re)build .venv only when
# pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and only when missing: these are the wheels this project's machines
# carry on disk; elsewhere set TORCH_SPEC (e.g. TORCH_SPEC="torch torchvision") to taste.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DATA ?= data/openmoji

.PHONY: run ablation test test-long test-faults bench-scale venv clean

$(VENV)/.installed-%: pyproject.toml tests/requirements-no-deps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$*]"
	@case "$*" in *test*) $(BIN)/pip install -q --no-deps -r tests/requirements-no-deps.txt;; esac
	@touch $@

# The stamp's suffix is the extras installed: `cpu` (faiss on CPU), `demo` (the demo data builder), `serve`, `test`.
venv: $(VENV)/.installed-cpu,demo,serve

run: $(VENV)/.installed-cpu,demo,serve
	$(BIN)/litpipe demo-data --out $(DEMO_DATA)
	$(BIN)/litpipe run pipeline.yaml

# LiT's ablation on the demo: L (locked pretrained tower) vs u (random tower) vs shuffled captions.
ablation: $(VENV)/.installed-cpu,demo,serve
	$(BIN)/litpipe demo-data --out $(DEMO_DATA)
	$(BIN)/litpipe ablation pipeline.yaml

test: $(VENV)/.installed-cpu,demo,test
	$(BIN)/python -m pytest -q

# The longest end-to-end tests (about 10 minutes on 2 cores), apart so `make test` stays under 10: the demo's
# locked-beats-random result, a three-node Ray cluster, two-worker training runs, a whole run's console, S3
# faults through precompute, the kill tests of the precompute and text-feature jobs, sweeps on Ray Tune (a kill
# and resume, ASHA, a failing trial), Ctrl-C exit codes, the GPU runbook's dry run. CI runs both.
test-long: $(VENV)/.installed-cpu,demo,test
	$(BIN)/python -m pytest -q -m long

# The whole fault-injection suite (tests/faults/; `make test` runs its quick subset): seeded SIGKILLs at
# 24+ points per stage, object-store faults, a full disk. Its tally is the table in docs/reliability.md.
test-faults: $(VENV)/.installed-cpu,demo,test
	@mkdir -p runs && rm -f runs/faults.jsonl
	LITPIPE_FAULT_REPORT=$(CURDIR)/runs/faults.jsonl $(BIN)/python -m pytest -q -m "faults or not faults" tests/faults
	$(BIN)/python tests/faults/tally.py runs/faults.jsonl

# The scale rehearsal (bench/scale.py; not a test): SCALE crawl-like images in WebDataset shards, precomputed by a
# head and two worker nodes started as separate `ray start`s, the store on moto's S3 server; figures per run are
# appended to runs/scale.jsonl (docs/benchmarks.md has the table). About a minute at 100,000, 7 at 1,000,000.
SCALE ?= 100000
bench-scale: $(VENV)/.installed-cpu,demo,test
	$(BIN)/python bench/scale.py generate --images $(SCALE) --dir runs/scale-$(SCALE)
	$(BIN)/python bench/scale.py run --dir runs/scale-$(SCALE) --json runs/scale.jsonl

clean:
	rm -rf $(VENV) litpipe-store runs
