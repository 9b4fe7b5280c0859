# Every target creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: test test-slow demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[hf,data,experiments,test]'
	# kronfluence, for tests/test_kronfluence_agreement.py only: --no-deps, its metadata pulls torchvision (CUDA torch)
	$(PY) -m pip install --quiet --no-deps kronfluence==1.0.1 einops einconv opt_einsum
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/hyperinf mislabel --out runs/mislabel

bench: $(STAMP)
	$(PY) benchmarks/bench_schulz.py
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_distributed.py
	$(PY) benchmarks/bench_pass2.py

clean:
	rm -rf $(VENV) runs .pytest_cache
