# Every target creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

PEERS  := .venv-peers
PEERS_PY := $(PEERS)/bin/python
PEERS_STAMP := $(PEERS)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: test test-slow demo bench bench-peers clean

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

# The peer libraries live in their own environment. kronfluence's metadata asks for torchvision
# (which pulls CUDA torch), so it goes in with --no-deps plus its pure-Python dependencies.
$(PEERS_STAMP): pyproject.toml Makefile
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS)
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	$(PEERS_PY) -m pip install --quiet torch==2.13.0
	$(PEERS_PY) -m pip install --quiet -e '.[hf,data,experiments]'
	$(PEERS_PY) -m pip install --quiet --no-deps kronfluence==1.0.1 einops einconv opt_einsum
	$(PEERS_PY) -m pip install --quiet dattri==0.3.0 captum==0.9.0 mlxtend
	rm -f $(PEERS)/.installed-*
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/bench_peers.py --out runs/peers

clean:
	rm -rf $(VENV) $(PEERS) runs .pytest_cache
