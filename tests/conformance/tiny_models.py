"""Tiny Stable Diffusion 1.x checkpoints with random weights, for the real WebUIs on CPU.

Run with a WebUI's interpreter (torch, transformers, safetensors, omegaconf), not the project's::

    python tiny_models.py --ldm SRC/repositories/stable-diffusion-stability-ai --out DIR

It writes, under ``DIR``:

``a1111/``
    ``tiny-a.safetensors`` and ``tiny-b.safetensors``: the SD1 architecture at toy sizes (UNet of
    32 channels, CLIP text encoder of width 32, VAE of 32 channels; about 3 M parameters), the
    model config they need as ``tiny-sd1.yaml`` (A1111's ``--config``: its guess from the state
    dict would build the full-size model), and ``clip-tiny/``, the text encoder's config and
    tokenizer, which the config names in place of ``openai/clip-vit-large-patch14``.
``comfyui/``
    ``shallow-a.safetensors`` and ``shallow-b.safetensors`` (fp16): what ComfyUI's model
    detection accepts as SD 1.5 (``model_channels`` 320, context 768, full-size VAE and CLIP-L)
    with the UNet cut to one level of one res block; about 230 M parameters.

The images these make are noise; everything around them is the WebUIs' real code path. The
tokenizer's vocabulary is CLIP's, rebuilt from the BPE merges that open_clip ships on PyPI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

# The image build's CLIP tokenizer maker: the tiny text encoders get the same tokenizer as SD1's.
_spec = importlib.util.spec_from_file_location(
    "clip_l_offline", Path(__file__).resolve().parents[2] / "packer/provisioners/clip-l-offline.py"
)
assert _spec is not None and _spec.loader is not None
clip_l_offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clip_l_offline)
write_tokenizer, clip_text_config = clip_l_offline.write_tokenizer, clip_l_offline.clip_text_config

UNET_SD1 = {"image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
            "transformer_depth": 1, "use_checkpoint": False, "legacy": False}  # fmt: skip
VAE_SD1 = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
           "ch_mult": [1, 2, 4, 4], "attn_resolutions": [], "dropout": 0.0}  # fmt: skip


def model_config(unet: dict[str, Any], vae_ch: int, vae_blocks: int, clip_dir: Path) -> dict[str, Any]:
    """An SD1 ``LatentDiffusion`` config (configs/v1-inference.yaml's shape) at the given sizes."""
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64,
            "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {**UNET_SD1, **unet}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"},
                "ddconfig": {**VAE_SD1, "ch": vae_ch, "num_res_blocks": vae_blocks}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": str(clip_dir), "device": "cpu"}},
        },
    }}  # fmt: skip


def build(config: dict[str, Any], seed: int, half: bool) -> dict[str, Any]:
    """The state dict of a model built from ``config`` with weights drawn from ``seed``."""
    import ldm.modules.encoders.modules as encoders
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig

    # The encoder is built from its config alone, as A1111 builds it (weights come from the file).
    def from_config(cls: Any, path: str, *_: Any, **__: Any) -> Any:
        return cls(CLIPTextConfig.from_pretrained(path))

    encoders.CLIPTextModel.from_pretrained = classmethod(from_config)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(config).model)
    with torch.no_grad():
        for parameter in model.parameters():  # ldm zero-initialises some outputs: noise everywhere
            parameter.normal_(0.0, 0.02)
    state = {key: value.contiguous() for key, value in model.state_dict().items() if not key.startswith("model_ema")}
    return {key: value.half() if half and value.is_floating_point() else value for key, value in state.items()}


def save(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    partial = path.with_suffix(".partial")
    save_file(state, str(partial))
    partial.replace(path)


def write_a1111_models(out: Path, bpe_gz: Path) -> None:
    clip_dir = out / "clip-tiny"
    write_tokenizer(bpe_gz, clip_dir)
    (clip_dir / "config.json").write_text(json.dumps(clip_text_config(width=32, layers=2, heads=2)))
    unet = {"model_channels": 32, "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2],
            "num_heads": 2, "context_dim": 32}  # fmt: skip
    config = model_config(unet, vae_ch=32, vae_blocks=1, clip_dir=clip_dir)
    import yaml

    (out / "tiny-sd1.yaml").write_text(yaml.safe_dump(config))
    for seed, name in enumerate(("tiny-a", "tiny-b"), start=1):
        save(build(config, seed, half=False), out / f"{name}.safetensors")


def write_comfyui_models(out: Path, bpe_gz: Path) -> None:
    clip_dir = out / "clip-l"
    write_tokenizer(bpe_gz, clip_dir)
    (clip_dir / "config.json").write_text(json.dumps(clip_text_config(width=768, layers=12, heads=12)))
    unet = {"model_channels": 320, "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1],
            "num_heads": 8, "context_dim": 768}  # fmt: skip
    config = model_config(unet, vae_ch=128, vae_blocks=2, clip_dir=clip_dir)
    for seed, name in enumerate(("shallow-a", "shallow-b"), start=11):
        save(build(config, seed, half=True), out / f"{name}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ldm", type=Path, required=True, help="the stable-diffusion-stability-ai source tree")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.ldm))
    bpe_gz = clip_l_offline.open_clip_bpe()
    for webui, write in (("a1111", write_a1111_models), ("comfyui", write_comfyui_models)):
        folder = args.out / webui
        folder.mkdir(parents=True, exist_ok=True)
        write(folder, bpe_gz)
    (args.out / ".complete").touch()


if __name__ == "__main__":
    main()
