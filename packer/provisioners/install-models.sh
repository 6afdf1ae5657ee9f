#!/usr/bin/env bash
# Optional: bake model files from $MODELS_S3_URI into /opt/sdagent/models. Baked files are on the
# root volume's snapshot, which EBS loads lazily: without fast snapshot restore the first read of a
# multi-GB checkpoint is slow (docs/boot-budget.md). The agent's cache seeds the NVMe copy from here.
set -euo pipefail

if [[ -z "${MODELS_S3_URI:-}" ]]; then
  echo "install-models: no MODELS_S3_URI, nothing baked"
  exit 0
fi
: "${AWS_REGION:?AWS_REGION is required}"

if ! command -v aws >/dev/null; then
  echo "install-models: the aws CLI is missing from the base AMI" >&2
  exit 1
fi
install -d -m 0755 /opt/sdagent/models
# --exact-timestamps with sync: a second run copies nothing that is already there.
aws s3 sync --region "${AWS_REGION}" --only-show-errors --exact-timestamps "${MODELS_S3_URI}" /opt/sdagent/models
find /opt/sdagent/models -type f -exec chmod 0644 {} +
