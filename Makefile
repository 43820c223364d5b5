# The README's two quick-start commands are `make demo` and `make test`.
# Each creates .venv in the repository root and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo train-demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU kernels are built against the mlx this venv runs (setup.py): the build requirements
	# go into the venv first, and the package builds without an isolated build environment.
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" > $(VENV)/build-requires.txt
	$(PY) -m pip install --quiet -r $(VENV)/build-requires.txt
	$(PY) -m pip install --quiet --no-build-isolation -e ".[torch,onnx,tf,dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job on a bundled fixture: convert an ncps.torch AutoNCP CfC checkpoint, verify it
# against ncps.torch, print the parity report.
demo: $(STAMP)
	@mkdir -p out
	$(VENV)/bin/ncps-convert fixtures/torch/cfc_autoncp.pt --config fixtures/torch/cfc_autoncp.json \
		-o out/cfc_autoncp.safetensors --force

train-demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
