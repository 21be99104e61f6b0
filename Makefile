# The two commands: `make serve` (set up, prepare the default model, run the server) and
# `make test` (set up, run the whole test suite). Both work from a clean clone.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export LONGROPE_VENV := $(VENV)

.PHONY: install test-tools model serve test lint image image-cuda test-image

install:
	bash scripts/install.sh

# System tools the tests need (Debian's prometheus for tests/deploy); a no-op when present.
test-tools:
	bash scripts/install-test-tools.sh

model: install
	$(PY) -m server.default_model

serve: install
	$(VENV)/bin/longrope-serve $(ARGS)

test: install test-tools
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -ra --durations=20 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# The container image (docs/deploy.md): Docker when an engine answers, else podman, installed and configured
# here; a local Debian base and torch's CPU wheel served locally where no registry can be reached.
image:
	bash scripts/build-image.sh cpu

image-cuda:
	bash scripts/build-image.sh cuda

# Runs the CPU image as docs/deploy.md does (tests/deploy/test_image.py; skipped in `make test`, see there).
test-image: install test-tools image
	LONGROPE_IMAGE_TEST=1 $(PY) -m pytest -ra --durations=0 tests/deploy/test_image.py $(PYTEST_ARGS)
