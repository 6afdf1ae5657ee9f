#!/usr/bin/env bash
# One WebUI (a1111 or comfyui) at a pinned commit in /opt/sdagent-webui/<webui>, with its Python
# dependencies in its own virtualenv, and the Hugging Face files it would otherwise download on the
# first model load baked into /opt/sdagent-webui/hf-home (the unit runs it offline).
set -euo pipefail

: "${WEBUI:?WEBUI is required}"
: "${WEBUI_REPOSITORY:?WEBUI_REPOSITORY is required}"
: "${WEBUI_REVISION:?WEBUI_REVISION is required}"
: "${WEBUI_PYTHON:?WEBUI_PYTHON is required}"
: "${TORCH_INDEX_URL:?TORCH_INDEX_URL is required}"

if [[ ! "${WEBUI_REVISION}" =~ ^[0-9a-f]{40}$ ]]; then
  echo "install-webui: WEBUI_REVISION must be a full commit SHA, got '${WEBUI_REVISION}'" >&2
  exit 1
fi

root=/opt/sdagent-webui
dir="${root}/${WEBUI}"
export UV_PYTHON_INSTALL_DIR="${root}/python"
export HF_HOME="${root}/hf-home"

mkdir -p "${root}"
if [[ ! -d "${dir}/.git" ]]; then
  git clone --no-checkout "${WEBUI_REPOSITORY}" "${dir}"
fi
git -C "${dir}" fetch --quiet origin "${WEBUI_REVISION}" || true
git -C "${dir}" checkout --quiet --detach "${WEBUI_REVISION}"
test "$(git -C "${dir}" rev-parse HEAD)" = "${WEBUI_REVISION}"

uv python install "${WEBUI_PYTHON}"
if [[ ! -x "${dir}/venv/bin/python" ]]; then
  # --seed: pip in the venv, which A1111's prepare_environment() calls as "python -m pip".
  uv venv --seed --python "${WEBUI_PYTHON}" --python-preference only-managed "${dir}/venv"
fi
pip_install() { uv pip install --python "${dir}/venv/bin/python" --no-cache "$@"; }

case "${WEBUI}" in
  a1111)
    # What launch.py's prepare_environment() would install at first start, done here once:
    # torch for the driver's CUDA, the pinned requirements, and the repositories it clones.
    pip_install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
      torch torchvision
    pip_install -r "${dir}/requirements_versions.txt"
    (cd "${dir}" && "${dir}/venv/bin/python" -c \
      'from modules import launch_utils; launch_utils.prepare_environment()' \
      --skip-torch-cuda-test --no-download-sd-model)
    # The CLIP tokenizer SD 1.x loads on the first model load, fetched now so the unit can run offline.
    "${dir}/venv/bin/python" -c \
      'from transformers import CLIPTokenizer; CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")'
    ;;
  comfyui)
    pip_install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
      torch torchvision torchaudio
    pip_install -r "${dir}/requirements.txt"
    ;;
  *)
    echo "install-webui: unknown WEBUI '${WEBUI}' (a1111 or comfyui)" >&2
    exit 1
    ;;
esac

# The service user owns nothing here: the install is read-only at run time (ProtectSystem=strict).
chown -R root:root "${root}"
chmod -R go-w "${root}"
