#!/usr/bin/env bash
# Writes the image's version inventory as JSON to $OUTPUT: what is in it, at which version.
# Packer downloads it next to the manifest as <ami-name>-version-info.json.
set -euo pipefail

: "${WEBUI:?WEBUI is required}"
: "${WEBUI_REVISION:?WEBUI_REVISION is required}"
: "${OUTPUT:?OUTPUT is required}"

webui_python="/opt/sdagent-webui/${WEBUI}/venv/bin/python"
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "absent"; }

jq -n \
  --arg kernel "$(uname -r)" \
  --arg os "$(sed -n 's/^PRETTY_NAME="\(.*\)"$/\1/p' /etc/os-release)" \
  --arg nvidia_driver "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)" \
  --arg cuda "$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9.]*\).*/\1/p' | head -n1)" \
  --arg sdagent "$(/opt/sdagent/bin/python -c 'import importlib.metadata as m; print(m.version("sdagent"))')" \
  --arg agent_python "$(/opt/sdagent/bin/python -c 'import platform; print(platform.python_version())')" \
  --arg webui "${WEBUI}" \
  --arg webui_revision "${WEBUI_REVISION}" \
  --arg webui_python "$("${webui_python}" -c 'import platform; print(platform.python_version())')" \
  --arg torch "$("${webui_python}" -c 'import torch; print(torch.__version__)')" \
  --arg cloudwatch_agent "$(pkg_version amazon-cloudwatch-agent)" \
  --arg systemd "$(pkg_version systemd)" \
  --arg mdadm "$(pkg_version mdadm)" \
  --arg models "$(find /opt/sdagent/models -type f 2>/dev/null | wc -l)" \
  '{kernel: $kernel, os: $os, nvidia_driver: $nvidia_driver, cuda: $cuda,
    sdagent: $sdagent, agent_python: $agent_python,
    webui: {name: $webui, revision: $webui_revision, python: $webui_python, torch: $torch},
    packages: {"amazon-cloudwatch-agent": $cloudwatch_agent, systemd: $systemd, mdadm: $mdadm},
    baked_models: ($models | tonumber)}' >"${OUTPUT}"
cat "${OUTPUT}"
