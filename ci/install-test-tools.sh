#!/usr/bin/env bash
# Installs the system tools the test suite needs, and does nothing for one already there:
#   Java 17+ and Maven     the test broker (Kafka from Maven Central jars)
#   python3-venv, make     the project's virtualenv
#   Go 1.23+               must be present: AWS's ec2-metadata-mock and packer are built with it
#   packaging tools        systemd-analyze, shellcheck, cfn-lint, packer (install-packaging-tools.sh)
# Called by `make test`, so the README's test command works on a fresh machine.
set -euo pipefail

cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
java -version >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
mvn -v >/dev/null 2>&1 || missing+=(maven)
command -v make >/dev/null 2>&1 || missing+=(make)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-test-tools: apt-get install ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's golang-go is too old (1.23+ needed); this machine kind ships Go in /usr/local/go.
if [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:$PATH"; fi
command -v go >/dev/null 2>&1 || { echo "install-test-tools: go 1.23+ is required (AEMM, packer)" >&2; exit 1; }

bash ci/install-packaging-tools.sh
