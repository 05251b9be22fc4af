# effitrain: `make test` and `make demo` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effitrain-setup

.PHONY: venv ext test demo clean

venv: $(STAMP) ext

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $@

# effitrain's C extensions, both optional: the JPEG one (effitrain/jpeg.py; without it, a
# PIL fallback) and the store's file reader with a fast CRC32 (effitrain/store/prepare.py;
# without it, Python's os and zlib).
EXT_SO := effitrain/_jpegext.so
IO_SO := effitrain/_storeio.so
PY_INCLUDE = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
ext: $(EXT_SO) $(IO_SO)

EXT_SRC := effitrain/csrc/jpegext.c effitrain/csrc/recode.c
$(EXT_SO): $(EXT_SRC) effitrain/csrc/recode.h $(STAMP)
	@$(CC) -O2 -Wall -shared -fPIC -I"$(PY_INCLUDE)" \
	  $(EXT_SRC) -ljpeg -o $@ 2>$(VENV)/jpegext-build.log \
	  || echo "effitrain: C JPEG extension not built (see $(VENV)/jpegext-build.log); using the PIL fallback"

$(IO_SO): effitrain/csrc/storeio.c $(STAMP)
	@$(CC) -O2 -Wall -shared -fPIC -I"$(PY_INCLUDE)" $< -lz -o $@ 2>$(VENV)/storeio-build.log \
	  || echo "effitrain: C file reader not built (see $(VENV)/storeio-build.log); reading files in Python"

test: venv ext
	$(PY) -m pytest

# The whole pipeline on drawn data (effitrain/demo.py), after the same set-up as `make test`.
DEMO_OUT ?= demo-out
demo: venv ext
	$(PY) -m effitrain demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) build *.egg-info $(EXT_SO) $(IO_SO)
