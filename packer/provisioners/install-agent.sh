#!/usr/bin/env bash
# The agent in its own virtualenv, /opt/sdagent, from the wheel uploaded to $STAGING/dist.
# /opt/sdagent/bin/sdagent is what sdagent.service runs.
set -euo pipefail

: "${STAGING:?STAGING is required}"
: "${AGENT_PYTHON:?AGENT_PYTHON is required}"

shopt -s nullglob
wheels=("${STAGING}"/dist/sdagent-*.whl)
if [[ "${#wheels[@]}" -ne 1 ]]; then
  echo "install-agent: expected one sdagent wheel in ${STAGING}/dist, found ${#wheels[@]}" >&2
  exit 1
fi

# The interpreter lives under /opt/sdagent too, so the venv does not depend on root's home.
export UV_PYTHON_INSTALL_DIR=/opt/sdagent/python
uv python install "${AGENT_PYTHON}"
if [[ ! -x /opt/sdagent/bin/python ]]; then
  uv venv --python "${AGENT_PYTHON}" --python-preference only-managed /opt/sdagent
fi
# Reinstalling the same wheel is a no-op, so the script can run twice.
# The agent, plus the gateway's extra: sdagent-gateway.service ships in the image (not enabled), so
# an instance can serve the HTTP API without a second install. The simulator's extra stays out.
uv pip install --python /opt/sdagent/bin/python --no-cache "${wheels[0]}[gateway]"
/opt/sdagent/bin/sdagent --help >/dev/null
