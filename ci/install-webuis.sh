#!/usr/bin/env bash
# Builds the virtualenvs of the real WebUIs the conformance suite starts (AUTOMATIC1111 v1.10.1
# and ComfyUI 0.3.64, on CPU), cached under ~/.cache/sdagent/webui-venvs and keyed by what they
# install: a second run with the same pins costs a hash and a stat.
#
# Writes .webuis.env (KEY=VALUE lines) naming each WebUI's source tree and interpreter; the
# conformance fixtures read it. Sources come from ../shared/webuis (or $SDAGENT_WEBUI_SOURCES);
# everything installed comes from PyPI at pinned versions: nothing from GitHub.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
sources=${SDAGENT_WEBUI_SOURCES:-$(cd "$repo/.." && pwd)/shared/webuis}
cache=${SDAGENT_CACHE_DIR:-$HOME/.cache/sdagent}/webui-venvs
mkdir -p "$cache"

# The interpreter a WebUI was made to run with: pyenv's on these machines, else the PATH's.
find_python() {
  local version=$1 candidate
  for candidate in "$HOME"/.pyenv/versions/"$version".*/bin/python"$version" "$(command -v python"$version" || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  echo "install-webuis: python$version is required (pyenv install $version)" >&2
  return 1
}

# Pins are part of the key: change one and the venv is rebuilt beside the old one.
A1111_PINS="torch==2.1.2 torchvision==0.16.2"
A1111_NODEPS="openai-clip==1.0.1"
COMFYUI_PINS="torch==2.9.0 torchvision==0.24.0 torchaudio==2.9.0"
COMFYUI_EXTRA="requests==2.32.5"

venv_key() {  # name python requirements-file pins...
  local name=$1 python=$2 requirements=$3
  shift 3
  { echo "$name"; "$python" --version; cat "$requirements"; echo "$@"; } | sha256sum | cut -c1-12
}

build_venv() {  # dir python requirements-file pins nodeps extra
  local dir=$1 python=$2 requirements=$3 pins=$4 nodeps=$5 extra=$6
  if [ -f "$dir/.complete" ]; then return 0; fi
  echo "install-webuis: building $dir"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  local pip=("$dir/bin/python" -m pip install -q --disable-pip-version-check)
  # shellcheck disable=SC2086  # pins are space-separated requirement specifiers
  "${pip[@]}" $pins
  # The requirement files name torch unpinned: the constraint keeps the pinned one.
  # shellcheck disable=SC2086
  "${pip[@]}" -r "$requirements" $extra -c <(printf '%s\n' $pins)
  # shellcheck disable=SC2086
  if [ -n "$nodeps" ]; then "${pip[@]}" --no-deps $nodeps; fi
  touch "$dir/.complete"
}

a1111_src="$sources/a1111-v1.10.1"
comfy_src="$sources/comfyui-0.3.64"
for tree in "$a1111_src" "$comfy_src"; do
  [ -d "$tree" ] || { echo "install-webuis: no WebUI sources at $tree" >&2; exit 1; }
done

py310=$(find_python 3.10)
py311=$(find_python 3.11)
a1111_venv="$cache/a1111-$(venv_key a1111 "$py310" "$a1111_src/requirements_versions.txt" "$A1111_PINS" "$A1111_NODEPS")"
comfy_venv="$cache/comfyui-$(venv_key comfyui "$py311" "$comfy_src/requirements.txt" "$COMFYUI_PINS" "$COMFYUI_EXTRA")"

build_venv "$a1111_venv" "$py310" "$a1111_src/requirements_versions.txt" "$A1111_PINS" "$A1111_NODEPS" "" &
a1111_pid=$!
build_venv "$comfy_venv" "$py311" "$comfy_src/requirements.txt" "$COMFYUI_PINS" "" "$COMFYUI_EXTRA" &
comfy_pid=$!
wait "$a1111_pid"
wait "$comfy_pid"

cat >"$repo/.webuis.env" <<EOF
SDAGENT_A1111_SOURCE=$a1111_src
SDAGENT_A1111_PYTHON=$a1111_venv/bin/python
SDAGENT_COMFYUI_SOURCE=$comfy_src
SDAGENT_COMFYUI_PYTHON=$comfy_venv/bin/python
EOF
echo "install-webuis: ready ($(basename "$a1111_venv"), $(basename "$comfy_venv"))"
