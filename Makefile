# effitrain: `make test` and `make demo` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effitrain-setup

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $@

test: venv
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
