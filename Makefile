# Set-up, code generation, lint and tests. Every target creates what it needs (the venv, the protos).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# CPU build from the local wheel cache on this machine; override on a GPU host, e.g. TORCH_SPEC=torch==2.13.0
# with a CUDA index. Code runs on torch >= 2.4.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

PROTO_SRC := $(wildcard protos/twotower/v1/*.proto)
PROTO_STAMP := twotower/.generated
PROTOC_STAMP := $(VENV)/.installed-protoc
SETUP_STAMP := $(VENV)/.installed

.PHONY: setup proto test test-reliability lint format clean train run-stack

# Order: venv -> protoc (grpcio-tools alone) -> generated ./twotower -> the project's editable install.
# The install must come after the protos: setuptools' editable finder maps only the top-level packages
# that exist when it is installed, and the console scripts (.venv/bin/twotower, twotower-stack, the
# services) run with .venv/bin on sys.path, not the repo, so a ./twotower generated afterwards would be
# importable only through `python -m` from the repo root. docker/install.sh does the same for the image.
setup: $(SETUP_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(PROTOC_STAMP): constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt grpcio-tools
	touch $@

proto: $(PROTO_STAMP)

# Generated code goes to ./twotower (gitignored): protoc's imports (`from twotower.v1 import ...`)
# resolve as-is because the package root is mapped by the editable install (see above).
$(PROTO_STAMP): $(PROTO_SRC) constraints.txt | $(PROTOC_STAMP)
	rm -rf twotower
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)
	touch twotower/__init__.py twotower/v1/__init__.py
	touch $@

# Re-installs when the dependency declarations change or the protos were regenerated (about 5 s when
# nothing else changed; this also repairs a venv installed before ./twotower existed). The last line
# proves, from outside the repo, that the installed scripts will find both the code and the protos.
$(SETUP_STAMP): pyproject.toml constraints.txt $(PROTO_STAMP) | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,parquet]"
	cd / && "$(CURDIR)/$(PY)" -c "import shared, twotower_cli, twotower.v1"
	touch $@

# MovieLens-100K (GroupLens), as packaged in the RecBole 1.2.1 wheel: fetched once into .cache/ (never
# committed, never installed), read out of the zip by training/data.py, which verifies its digests.
MOVIELENS_CACHE := .cache/recbole
MOVIELENS_WHEEL := $(MOVIELENS_CACHE)/recbole-1.2.1-py3-none-any.whl
ARTIFACTS ?= artifacts/movielens
TRAIN_ARGS ?=
STACK_ARGS ?=

$(MOVIELENS_WHEEL): | $(SETUP_STAMP)
	$(PY) -m pip download --quiet --no-deps recbole==1.2.1 -d $(MOVIELENS_CACHE)

# Retrains only when the data, the training code or the model code changed since the last export
# (metrics.json is written last, inside a directory swapped in atomically).
# What run-stack and the benchmarks need: the served model (one seed) and the fast baselines (EASE,
# item-kNN, popularity), a few minutes here. `make train` adds the 3-seed spread and SASRec.
$(ARTIFACTS)/metrics.json: $(MOVIELENS_WHEEL) $(wildcard training/*.py) $(wildcard shared/model/*.py) | $(SETUP_STAMP)
	$(PY) -m training --out $(ARTIFACTS) --cache-dir $(MOVIELENS_CACHE) --seeds 1 --no-sasrec $(TRAIN_ARGS)

# The whole results table: the served model, two more seeds for mean ± std, and SASRec (the extra
# seeds' and SASRec's metrics are cached under .cache/runs by data + code + config digest, so only the
# first run pays for them).
train: setup $(MOVIELENS_WHEEL)
	$(PY) -m training --out $(ARTIFACTS) --cache-dir $(MOVIELENS_CACHE) $(TRAIN_ARGS)

# The three services on loopback with the MovieLens model and corpus (trained first when missing).
run-stack: setup $(ARTIFACTS)/metrics.json
	$(PY) -m twotower_cli.stack --artifacts $(ARTIFACTS) $(STACK_ARGS)

# Benchmarks: quick by default (the whole run stays under 10 minutes on the 2-core dev box); FULL=1 runs
# the long versions. Results (JSON, report.md, PNG plots) go to results/ (gitignored).
BENCH_MODE := $(if $(FULL),,--quick)
BENCH_STAMP := $(VENV)/.installed-bench
.PHONY: bench bench-candidate bench-user bench-index bench-e2e bench-grpc-floor bench-report

$(BENCH_STAMP): pyproject.toml constraints.txt | $(SETUP_STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,parquet,bench]"
	touch $@

bench: bench-grpc-floor bench-candidate bench-user bench-index bench-e2e
	$(PY) bench/report.py
bench-grpc-floor: setup $(BENCH_STAMP)
	$(PY) bench/grpc_floor.py
bench-candidate: setup $(BENCH_STAMP)
	$(PY) bench/candidate_bench.py $(BENCH_MODE)
bench-user: setup $(BENCH_STAMP)
	$(PY) bench/user_bench.py $(BENCH_MODE)
bench-index: setup $(BENCH_STAMP)
	$(PY) bench/index_bench.py $(BENCH_MODE)
bench-e2e: setup $(BENCH_STAMP) $(ARTIFACTS)/metrics.json
	$(PY) bench/e2e_bench.py $(BENCH_MODE)
bench-report: setup $(BENCH_STAMP)
	$(PY) bench/report.py

# Everything but the slowest reliability tests (kill sweep, long soak): those run in test-reliability.
test: setup
	$(PY) -m pytest -m "not (reliability and slow)" $(PYTEST_ARGS)

# Every reliability test: faults, bad input, overload and soak, TLS (~4.5 min on 2 cores).
test-reliability: setup
	$(PY) -m pytest -m reliability tests/reliability $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf twotower $(VENV) .pytest_cache .ruff_cache
