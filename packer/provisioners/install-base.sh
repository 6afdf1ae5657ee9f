#!/usr/bin/env bash
# System packages the image needs beyond the base AMI, and uv (virtualenvs with pinned CPython).
#   mdadm, xfsprogs     prepare-nvme: RAID 0 and XFS on the instance store
#   libtcmalloc-minimal4  AUTOMATIC1111 without RAM growth on model switches
#   git                 checking out the WebUI at its pinned commit
#   jq, curl            validate.sh, generate-version-info.sh, the CloudWatch agent download
#   python3-venv        a virtualenv for uv
set -euo pipefail

: "${UV_VERSION:?UV_VERSION is required}"

export DEBIAN_FRONTEND=noninteractive
# cloud-init may still be running apt on first boot of the build instance.
cloud-init status --wait >/dev/null || true
apt-get update -q
apt-get install -y -q --no-install-recommends \
  mdadm xfsprogs libtcmalloc-minimal4 git jq curl ca-certificates python3-venv
# The base AMI's unattended upgrades would race later apt calls and, on the fleet, reboot nodes.
systemctl disable --now unattended-upgrades.service apt-daily.timer apt-daily-upgrade.timer || true

# uv from PyPI, pinned, in a virtualenv of its own (the system Python stays untouched); its managed
# CPython builds give the agent 3.11+ on Ubuntu 22.04, whose Python is 3.10.
if [[ "$(/opt/uv/bin/uv --version 2>/dev/null)" != "uv ${UV_VERSION}"* ]]; then
  python3 -m venv /opt/uv
  /opt/uv/bin/pip install --no-cache-dir --quiet "uv==${UV_VERSION}"
fi
ln -sfn /opt/uv/bin/uv /usr/local/bin/uv
uv --version
