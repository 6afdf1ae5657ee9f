#!/usr/bin/env bash
# Leaves nothing of this build instance in the image: package caches, logs, shell history, SSH host
# keys and authorized keys (each instance makes its own), the machine id (each boot makes one),
# cloud-init's per-instance state (so that user data runs on every instance).
set -euo pipefail

: "${STAGING:?STAGING is required}"

apt-get clean
rm -rf /var/lib/apt/lists/* /root/.cache /home/*/.cache "${STAGING}"
rm -f /etc/ssh/ssh_host_*
rm -f /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys
rm -f /root/.bash_history /home/*/.bash_history
cloud-init clean --logs --seed
# Empty, not deleted: systemd makes a new id at first boot and marks it as first boot.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
journalctl --rotate >/dev/null 2>&1 || true
journalctl --vacuum-time=1s >/dev/null 2>&1 || true
find /var/log -type f -name '*.log' -exec truncate -s 0 {} +
rm -f /var/log/wtmp /var/log/btmp /var/log/lastlog
