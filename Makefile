# effitrain: `make test` and `make demo` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effitrain-setup

.PHONY: venv ext test demo clean

venv: $(STAMP) ext

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $@

# effitrain's C JPEG extension (effitrain/jpeg.py); optional: without it, a PIL fallback.
EXT_SO := effitrain/_jpegext.so
ext: $(EXT_SO)

EXT_SRC := effitrain/csrc/jpegext.c effitrain/csrc/recode.c
$(EXT_SO): $(EXT_SRC) effitrain/csrc/recode.h $(STAMP)
	@$(CC) -O2 -Wall -shared -fPIC -I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
	  $(EXT_SRC) -ljpeg -o $@ 2>$(VENV)/jpegext-build.log \
	  || echo "effitrain: C JPEG extension not built (see $(VENV)/jpegext-build.log); using the PIL fallback"

test: venv ext
	$(PY) -m pytest

# The whole pipeline on drawn data (effitrain/demo.py), after the same set-up as `make test`.
DEMO_OUT ?= demo-out
demo: venv ext
	$(PY) -m effitrain demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) build *.egg-info $(EXT_SO)
