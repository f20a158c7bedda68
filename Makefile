# Two commands a newcomer needs: `make demo` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdreid-installed
DATA ?= data
# Torch is pinned here, in the install step, and kept a range in pyproject.toml so that the package also runs on
# other torch builds (the GPU machine has torch 2.11).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# torchreid's sources are a test-only reference (parity tests); fetched once from PyPI as an sdist.
REFERENCE := .cache/reference/torchreid-0.2.5.tar.gz

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install $(TORCH_PIN) -e '.[test,viz,export]'
	touch $(STAMP)

$(REFERENCE): | $(STAMP)
	mkdir -p $(dir $@)
	$(BIN)/python -m pip download --no-deps --no-binary :all: torchreid==0.2.5 -d $(dir $@)

install: $(STAMP)

# The demo: write the four synthetic domains, check each layout, and score the colour-histogram baseline on
# each (a floor any learned model must beat). Later stages extend it to the full pipeline.
DEMO_DOMAINS := synth_market synth_duke synth_cuhk synth_msmt
demo: $(STAMP)
	$(BIN)/kdreid data synth --out $(DATA) --scale 0.1 --seed 0
	for domain in $(DEMO_DOMAINS); do \
	  $(BIN)/kdreid data check --root $(DATA) -d $$domain || exit 1; \
	  $(BIN)/kdreid data baseline --root $(DATA) -d $$domain || exit 1; \
	done

test: $(STAMP) $(REFERENCE)
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .cache
