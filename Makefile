# Two commands a newcomer needs: `make demo` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdreid-installed
DATA ?= data
# Torch is pinned here, in the install step, and kept a range in pyproject.toml so that the package also runs on
# other torch builds (the GPU machine has torch 2.11; the range's floor, torch 2.4.1 with torchvision 0.19.1, passes
# the test suite on the CPU: kdreid falls back where torch 2.4 and 2.5 lack an API).
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

# The demo: the whole method on the synthetic domains, `kdreid pipeline --preset quick` from synth_msmt to the
# other three, which ends by printing its results table (runs/demo/results.md), then its pictures and tables as one
# page (runs/demo/report.html: `kdreid report`). The domains are written small
# (about 6,400 images at 64x32) so that the seven stages fit in about 10 minutes on 2 CPU cores; running it again
# reuses the data and every finished stage.
DEMO_DATA ?= $(DATA)/demo
DEMO_RUN ?= runs/demo
DEMO_SOURCE := synth_msmt
DEMO_TARGETS := synth_market synth_duke synth_cuhk
$(DEMO_DATA)/.written: | $(STAMP)
	$(BIN)/kdreid data synth --out $(DEMO_DATA) --scale 0.03 --size 64x32 --seed 0
	touch $@

demo: $(STAMP) $(DEMO_DATA)/.written
	$(BIN)/kdreid pipeline -s $(DEMO_SOURCE) -t $(DEMO_TARGETS) --root $(DEMO_DATA) --preset quick --out $(DEMO_RUN)
	$(BIN)/kdreid report $(DEMO_RUN)

test: $(STAMP) $(REFERENCE)
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .cache
