#!/usr/bin/env bash
# Writes packer/locks/<webui>.txt from the virtualenvs in .webuis.env (ci/install-webuis.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. ./.webuis.env
for webui in a1111 comfyui forge; do
  var="SDAGENT_${webui^^}_PYTHON"
  {
    echo "# pip freeze of the virtualenv the conformance suite ran $webui in (ci/install-webuis.sh); the image"
    echo "# installs exactly these (packer/provisioners/install-webui.sh). Regenerate: make webui-locks"
    "${!var}" -m pip freeze --exclude-editable --disable-pip-version-check | sort -f
  } >"packer/locks/$webui.txt"
done
