#!/usr/bin/env bash
# Asserts the image before it is saved: services enabled, commands present, the GPU visible, and
# nothing of the build instance left behind. Any failure fails the build.
set -euo pipefail

: "${WEBUI:?WEBUI is required}"

failures=0
fail() { echo "validate: $*" >&2; failures=$((failures + 1)); }

for unit in sdagent.service sdagent-webui.service sdagent-nvme.service amazon-cloudwatch-agent.service \
  nvidia-persistenced.service; do
  systemctl is-enabled --quiet "${unit}" || fail "${unit} is not enabled"
done

for command in /opt/sdagent/bin/sdagent /usr/libexec/sdagent/prepare-nvme /usr/libexec/sdagent/webui \
  "/opt/sdagent-webui/${WEBUI}/venv/bin/python" nvidia-smi nvidia-modprobe mdadm mkfs.xfs jq \
  /opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl; do
  command -v "${command}" >/dev/null || fail "missing command ${command}"
done

id sdagent >/dev/null 2>&1 || fail "no sdagent user"
[[ -L /etc/systemd/system/sdagent-webui.service.d/00-backend.conf ]] || fail "no backend drop-in"
systemd-analyze verify sdagent.service sdagent-webui.service sdagent-nvme.service \
  || fail "systemd-analyze verify"
/opt/sdagent/bin/python -c 'import sdagent.cli' || fail "the agent does not import"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || fail "nvidia-smi sees no GPU"
"/opt/sdagent-webui/${WEBUI}/venv/bin/python" -c 'import torch; assert torch.cuda.is_available()' \
  || fail "torch in the ${WEBUI} venv sees no CUDA device"

for leftover in /etc/ssh/ssh_host_* /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys \
  /var/lib/cloud/instance /var/lib/cloud/instances/* /tmp/sdagent-build; do
  if [[ -e "${leftover}" ]]; then fail "${leftover} should not be in the image"; fi
done
if [[ -s /etc/machine-id ]]; then fail "/etc/machine-id is not empty"; fi

free_mib="$(df -m --output=avail / | tail -n1 | tr -d ' ')"
[[ "${free_mib}" -ge 4096 ]] || fail "only ${free_mib} MiB free on /"

if [[ "${failures}" -gt 0 ]]; then
  echo "validate: ${failures} check(s) failed" >&2
  exit 1
fi
echo "validate: image OK"
