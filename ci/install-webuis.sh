#!/usr/bin/env bash
# Builds the virtualenvs of the real WebUIs the conformance suite starts (AUTOMATIC1111 v1.10.1
# and ComfyUI 0.3.64, on CPU), cached under ~/.cache/sdagent/webui-venvs and keyed by what they
# install (packer/locks, the image's versions): a second run costs a hash and a stat.
#
# Writes .webuis.env (KEY=VALUE lines) naming each WebUI's source tree and interpreter; the
# conformance fixtures read it. Sources come from ../shared/webuis (or $SDAGENT_WEBUI_SOURCES);
# everything installed comes from PyPI at the locked versions: nothing from GitHub.
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

# packer/locks: every package at the version the image installs; the lock's hash is the venv's key,
# so a changed lock builds a new venv beside the old one. --no-deps: the lock is complete.
venv_key() {  # name python lock
  { echo "$1"; "$2" --version; cat "$3"; } | sha256sum | cut -c1-12
}

build_venv() {  # dir python lock
  local dir=$1 python=$2 lock=$3
  if [ -f "$dir/.complete" ]; then return 0; fi
  echo "install-webuis: building $dir"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$lock"
  touch "$dir/.complete"
}

# To change a version: edit the lock, or rebuild a venv from the WebUI's requirements and
# regenerate it (make webui-locks).
a1111_src="$sources/a1111-v1.10.1"
comfy_src="$sources/comfyui-0.3.64"
forge_src="$sources/forge-dfdcbab6"
for tree in "$a1111_src" "$comfy_src" "$forge_src"; do
  [ -d "$tree" ] || { echo "install-webuis: no WebUI sources at $tree" >&2; exit 1; }
done

py310=$(find_python 3.10)
py311=$(find_python 3.11)
a1111_lock="$repo/packer/locks/a1111.txt"
comfy_lock="$repo/packer/locks/comfyui.txt"
forge_lock="$repo/packer/locks/forge.txt"
a1111_venv="$cache/a1111-$(venv_key a1111 "$py310" "$a1111_lock")"
comfy_venv="$cache/comfyui-$(venv_key comfyui "$py311" "$comfy_lock")"
forge_venv="$cache/forge-$(venv_key forge "$py310" "$forge_lock")"

build_venv "$a1111_venv" "$py310" "$a1111_lock" &
a1111_pid=$!
build_venv "$comfy_venv" "$py311" "$comfy_lock" &
comfy_pid=$!
build_venv "$forge_venv" "$py310" "$forge_lock" &
forge_pid=$!
wait "$a1111_pid"
wait "$comfy_pid"
wait "$forge_pid"

cat >"$repo/.webuis.env" <<EOF
SDAGENT_A1111_SOURCE=$a1111_src
SDAGENT_A1111_PYTHON=$a1111_venv/bin/python
SDAGENT_COMFYUI_SOURCE=$comfy_src
SDAGENT_COMFYUI_PYTHON=$comfy_venv/bin/python
SDAGENT_FORGE_SOURCE=$forge_src
SDAGENT_FORGE_PYTHON=$forge_venv/bin/python
EOF
echo "install-webuis: ready ($(basename "$a1111_venv"), $(basename "$comfy_venv"), $(basename "$forge_venv"))"
