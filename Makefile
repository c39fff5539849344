# The two commands of the README:  make demo  (the main job)  and  make test  (the test suite).
# Both create .venv and install what is missing, so on a fresh machine they are all the set-up.
#
# torch is installed FIRST and never upgraded afterwards: on this CPU machine TORCH pins the local
# CPU wheel; on a GPU machine set TORCH to your CUDA build (or create .venv with your torch in it).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.mv3d-installed
CONSTRAINTS := $(VENV)/constraints.txt
# the optional extras the stages need (seg: nnU-Net v2, vqa: caption metrics, prognosis: SimpleITK, track: TensorBoard)
EXTRAS ?= dev,seg,vqa,prognosis,track
PYTEST_ARGS ?=
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-fast clean-demo help

help:
	@echo "make demo   run the quickstart on synthetic data, on the CPU (creates .venv on first use)"
	@echo "make test   run the whole test suite (creates .venv on first use)"

$(STAMP): pyproject.toml plugins/mv3d-stats/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH)"; $(PIP) install $(TORCH); }
	@# every later install is held to the torch now installed: an extra (nnunetv2 -> timm -> torchvision)
	@# would otherwise swap it for a multi-GB CUDA build
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PIP) install -c $(CONSTRAINTS) -e plugins/mv3d-stats
	@# PyPI's torchvision (pulled in by nnunetv2 -> timm) is a CUDA build: beside a CPU torch it fails to import
	@# ("operator torchvision::nms does not exist") and transformers then loads no text model at all. mv3d needs
	@# no torchvision, so it goes where it does not import (a GPU machine with a matching pair keeps it).
	@$(PY) -c "import torchvision" 2>/dev/null || { echo "removing torchvision: it does not import beside torch $$($(PY) -c 'import torch; print(torch.__version__)')"; $(PIP) uninstall -y torchvision; }
	@$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash recipes/quickstart.sh

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf demo
