#!/usr/bin/env bash
# Packs a WebUI source tree for the image build: the build instance downloads no source, it gets
# this file (uploaded by Packer) and checks it against the .sha256 written beside it.
#
#   packer/make-webui-bundle.sh a1111 ../shared/webuis/a1111-v1.10.1 dist/webui-a1111.tar.gz
#
# An A1111 tree must hold the repositories/ its launch_utils.py would clone at first start
# (stable-diffusion-stability-ai, generative-models, k-diffusion, BLIP, the assets), at the
# commits it pins: the image starts A1111 with --skip-prepare-environment.
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 a1111|comfyui SOURCE_TREE OUT.tar.gz" >&2
  exit 2
fi
webui=$1 tree=$2 out=$3

case "${webui}" in
  a1111)
    for repository in stable-diffusion-stability-ai generative-models k-diffusion BLIP stable-diffusion-webui-assets; do
      if [[ ! -d "${tree}/repositories/${repository}" ]]; then
        echo "make-webui-bundle: ${tree}/repositories/${repository} is missing" >&2
        exit 1
      fi
    done
    test -f "${tree}/launch.py" || { echo "make-webui-bundle: ${tree} is not an A1111 tree" >&2; exit 1; }
    ;;
  comfyui)
    test -f "${tree}/main.py" -a -f "${tree}/comfyui_version.py" \
      || { echo "make-webui-bundle: ${tree} is not a ComfyUI tree" >&2; exit 1; }
    ;;
  *)
    echo "make-webui-bundle: unknown WebUI '${webui}' (a1111 or comfyui)" >&2
    exit 2
    ;;
esac

mkdir -p "$(dirname "${out}")"
# Reproducible: sorted names, fixed owner and times, no VCS or caches.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  --exclude=.git --exclude=__pycache__ --exclude=venv \
  -C "${tree}" -czf "${out}" .
(cd "$(dirname "${out}")" && sha256sum "$(basename "${out}")" >"$(basename "${out}").sha256")
echo "make-webui-bundle: ${out} ($(cut -c1-12 <"${out}.sha256"))"
