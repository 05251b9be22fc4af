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

# The C parts need headers: libjpeg-turbo and zlib (pillow-simd, effitrain's JPEG extension),
# libwebp and libtiff (so WEBP and TIFF images read, as they do with PyPI's Pillow).
deb_pkgs=(libjpeg62-turbo-dev zlib1g-dev libwebp-dev libtiff-dev)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s "${deb_pkgs[@]}" >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${deb_pkgs[@]}") >/dev/null 2>&1 \
      || echo "setup: could not apt-get install ${deb_pkgs[*]}; continuing"
  fi
fi

# pillow-simd must come last: any later install that pulls `pillow` silently replaces it.
# Its SIMD resize and colour conversion only use AVX2 when compiled with it.
pillow_version=$("$venv/bin/python" -c 'import PIL; print(PIL.__version__)')
simd_cc=${CC:-cc}
grep -qw avx2 /proc/cpuinfo 2>/dev/null && simd_cc="$simd_cc -mavx2"
"${pip[@]}" uninstall -y pillow
if CC="$simd_cc" "${pip[@]}" install --no-deps --no-cache-dir "pillow-simd==12.1.1.post0" >"$venv/pillow-simd-build.log" 2>&1; then
  echo "setup: pillow-simd $("$venv/bin/python" -c 'import PIL; print(PIL.__version__)') installed (CC=$simd_cc)"
else
  echo "setup: pillow-simd could not be built (see $venv/pillow-simd-build.log); using Pillow $pillow_version"
  "${pip[@]}" install "pillow==$pillow_version"
fi
