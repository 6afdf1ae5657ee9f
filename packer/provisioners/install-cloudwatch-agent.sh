#!/usr/bin/env bash
# The Amazon CloudWatch agent (host, GPU and log metrics) and its configuration, from
# cloudwatch/agent.json in this repository, uploaded to $STAGING/cloudwatch-agent.json.
set -euo pipefail

: "${STAGING:?STAGING is required}"
: "${CLOUDWATCH_AGENT_URL:?CLOUDWATCH_AGENT_URL is required}"

config="${STAGING}/cloudwatch-agent.json"
jq empty "${config}"

if ! dpkg -s amazon-cloudwatch-agent >/dev/null 2>&1; then
  deb="$(mktemp --suffix=.deb)"
  curl --fail --silent --show-error --location --retry 3 -o "${deb}" "${CLOUDWATCH_AGENT_URL}"
  dpkg -i "${deb}"
  rm -f "${deb}"
fi

ctl=/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl
install -m 0644 "${config}" /opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json
# fetch-config translates and checks the JSON now, so a bad file fails the build, not the fleet;
# no -s (start): the image is not a running host yet, the unit starts the agent at boot.
"${ctl}" -a fetch-config -m ec2 -c file:/opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json
systemctl enable amazon-cloudwatch-agent.service
