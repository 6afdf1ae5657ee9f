#!/usr/bin/env bash
# The runtime files (systemd/rootfs in the repository, uploaded to $STAGING/rootfs) copied to the
# same paths in the image, the service user, the backend drop-ins for $WEBUI, and the units enabled.
set -euo pipefail

: "${STAGING:?STAGING is required}"
: "${WEBUI:?WEBUI is required}"

cp -R --no-preserve=ownership "${STAGING}/rootfs/." /
chmod 0755 /usr/libexec/sdagent/prepare-nvme /usr/libexec/sdagent/webui
install -d -m 0755 /usr/share/doc/sdagent
install -m 0644 "${STAGING}"/docs/*.md /usr/share/doc/sdagent/

# The user now, not at first boot, so that the image's files can be owned by it.
systemd-sysusers /usr/lib/sysusers.d/sdagent.conf

backend="/usr/share/sdagent/backends/${WEBUI}"
if [[ ! -d "${backend}" ]]; then
  echo "install-units: no backend drop-ins for '${WEBUI}' in ${backend}" >&2
  exit 1
fi
ln -sfn "${backend}/webui.conf" /etc/systemd/system/sdagent-webui.service.d/00-backend.conf
ln -sfn "${backend}/agent.conf" /etc/systemd/system/sdagent.service.d/00-backend.conf

systemctl daemon-reload
systemd-analyze verify sdagent.service sdagent-webui.service sdagent-nvme.service sdagent-gateway.service
# The gateway is installed, not enabled: it runs on the hosts chosen for it (docs/gateway.md).
systemctl enable sdagent-nvme.service sdagent-webui.service sdagent.service
