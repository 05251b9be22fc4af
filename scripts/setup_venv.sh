#!/usr/bin/env bash
# Create the project's virtual environment from nothing: torch + torchvision, effitrain
# (editable, with test and plot extras), then pillow-simd in place of Pillow.
# Usage: scripts/setup_venv.sh VENV_DIR
set -euo pipefail
venv=${1:-.venv}
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# This machine's pip config lists local package mirrors that may not hold every name; pip
# warns once per missing one. Those warnings are noise here, so hide just them.
exec 2> >(grep -v "^WARNING: Location .* is ignored" >&2)
"${pip[@]}" install "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" install -e ".[test,plot]"

# The C parts (pillow-simd, effitrain's JPEG extension) need libjpeg-turbo and zlib headers.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s libjpeg62-turbo-dev zlib1g-dev >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg62-turbo-dev zlib1g-dev) >/dev/null 2>&1 \
      || echo "setup: could not apt-get install libjpeg62-turbo-dev zlib1g-dev; continuing"
  fi
fi

# pillow-simd must come last: any later install that pulls `pillow` silently replaces it.
pillow_version=$("$venv/bin/python" -c 'import PIL; print(PIL.__version__)')
"${pip[@]}" uninstall -y pillow
if "${pip[@]}" install --no-deps --no-cache-dir "pillow-simd==12.1.1.post0" >"$venv/pillow-simd-build.log" 2>&1; then
  echo "setup: pillow-simd $("$venv/bin/python" -c 'import PIL; print(PIL.__version__)') installed"
else
  echo "setup: pillow-simd could not be built (see $venv/pillow-simd-build.log); using Pillow $pillow_version"
  "${pip[@]}" install "pillow==$pillow_version"
fi
