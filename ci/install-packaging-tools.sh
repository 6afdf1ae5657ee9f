#!/usr/bin/env bash
# Installs the tools tests/packaging runs, and does nothing for a tool already at its version:
#   systemd-analyze, shellcheck   Debian packages (systemd, shellcheck)
#   cfn-lint                      PyPI, into the project's virtualenv (.venv)
#   packer + its amazon plugin    built from the Go module proxy, cached in $SDAGENT_PACKAGING_TOOLS
#                                 (default ~/.cache/sdagent/packaging-tools): bin/packer, plugins/
# Debian's packer (1.6.6) predates HCL2 required_plugins and `packer plugins install`, and
# HashiCorp's own download site is out of reach, so packer is built from its Go module.
# First run: about 10 minutes (two Go builds, on 2 cores); later runs: seconds.
set -euo pipefail

cd "$(dirname "$0")/.."

PACKER_VERSION=1.11.2
AMAZON_PLUGIN_VERSION=1.8.0
CFN_LINT_VERSION=1.58.0
TOOLS="${SDAGENT_PACKAGING_TOOLS:-${HOME}/.cache/sdagent/packaging-tools}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- Debian packages ---------------------------------------------------------------------------
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-packaging-tools: apt-get install ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- cfn-lint in the project's virtualenv ------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  make venv
fi
if [ "$(.venv/bin/python -m pip show cfn-lint 2>/dev/null | sed -n 's/^Version: //p')" != "${CFN_LINT_VERSION}" ]; then
  .venv/bin/python -m pip install -q "cfn-lint==${CFN_LINT_VERSION}"
fi

# --- packer and the amazon plugin, from the Go module proxy ------------------------------------
if [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:${PATH}"; fi
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false

# `go install module@version` also reads the module's version list (for deprecation notices), which
# the proxy here refuses for these modules; downloading the exact version and building inside it
# works, and also honours the module's own replace directives, as its release builds do.
build_module() { # module version output
  local dir
  dir="$(go mod download -json "$1@v$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  if [ -z "${dir}" ]; then
    echo "install-packaging-tools: go mod download $1@v$2 failed" >&2
    return 1
  fi
  (cd "${dir}" && go build -trimpath -o "$3" .)
}

packer="${TOOLS}/bin/packer"
mkdir -p "${TOOLS}/bin" "${TOOLS}/plugins"
if [ "$("${packer}" version 2>/dev/null | head -n1)" != "Packer v${PACKER_VERSION}" ]; then
  command -v go >/dev/null 2>&1 || { echo "install-packaging-tools: go is needed to build packer" >&2; exit 1; }
  echo "install-packaging-tools: building packer ${PACKER_VERSION} (several minutes)"
  build_module github.com/hashicorp/packer "${PACKER_VERSION}" "${packer}"
fi

export PACKER_PLUGIN_PATH="${TOOLS}/plugins" CHECKPOINT_DISABLE=1
if ! "${packer}" plugins installed 2>/dev/null | grep -q "packer-plugin-amazon_v${AMAZON_PLUGIN_VERSION}_"; then
  echo "install-packaging-tools: building packer-plugin-amazon ${AMAZON_PLUGIN_VERSION} (several minutes)"
  plugin_binary="${TOOLS}/bin/packer-plugin-amazon"
  build_module github.com/hashicorp/packer-plugin-amazon "${AMAZON_PLUGIN_VERSION}" "${plugin_binary}"
  # Puts it where packer looks: plugins/github.com/hashicorp/amazon/packer-plugin-amazon_vX_x5.0_linux_amd64
  # plus its _SHA256SUM file.
  "${packer}" plugins install --path "${plugin_binary}" github.com/hashicorp/amazon
  rm -f "${plugin_binary}"
fi

echo "install-packaging-tools: systemd $(systemd-analyze --version | head -n1 | cut -d' ' -f2)," \
  "shellcheck $(shellcheck --version | sed -n 's/^version: //p')," \
  "cfn-lint $(.venv/bin/cfn-lint --version | awk '{print $2}')," \
  "$("${packer}" version | head -n1), amazon plugin ${AMAZON_PLUGIN_VERSION} in ${TOOLS}"
