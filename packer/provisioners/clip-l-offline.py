"""Puts CLIP ViT-L/14's text config and tokenizer in a Hugging Face cache, made from a PyPI package.

A1111 builds the SD1 text encoder with ``transformers`` from ``openai/clip-vit-large-patch14``
(config and tokenizer; the weights come from the checkpoint). Downloading them from the hub at
build time pins nothing; here they come from the BPE merges ``open-clip-torch`` ships (pinned in
packer/locks), written where ``HF_HUB_OFFLINE=1`` lookups find them. Standard library only: run
it with the WebUI's interpreter, which has ``open_clip``. The conformance fixtures use the same
functions for their tiny text encoders.

    python clip-l-offline.py --hf-home /opt/sdagent-webui/hf-home
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

REPO_ID = "openai/clip-vit-large-patch14"
# The snapshot name in the cache: what made the files, not a hub commit (none was fetched).
SNAPSHOT = "open-clip-bpe-simple-vocab-16e6"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 byte-ends, merges, 2 specials


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, which CLIP's BPE works in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def write_tokenizer(bpe_gz: Path, out: Path) -> None:
    """CLIP's tokenizer files (vocab.json, merges.txt) in the layout transformers reads."""
    merges = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")[1 : MERGES + 1]
    letters = list(byte_alphabet().values())
    vocab = letters + [letter + "</w>" for letter in letters] + ["".join(m.split()) for m in merges]
    vocab += [CLIP_BOS, CLIP_EOS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(specials))
    (out / "tokenizer_config.json").write_text(json.dumps({**specials, "model_max_length": 77,
                                                          "tokenizer_class": "CLIPTokenizer"}))  # fmt: skip


def clip_text_config(width: int = 768, layers: int = 12, heads: int = 12) -> dict[str, Any]:
    """A CLIP text model's config; the defaults are ViT-L/14's (SD1's text encoder)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
            "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_position_embeddings": 77, "vocab_size": 49408,
            "projection_dim": width, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
            "layer_norm_eps": 1e-5, "initializer_factor": 1.0, "initializer_range": 0.02}  # fmt: skip


def open_clip_bpe() -> Path:
    import open_clip  # the WebUI's interpreter has it

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def install(hf_home: Path, bpe_gz: Path) -> Path:
    """The cache entry huggingface_hub resolves offline: refs/main naming a snapshot."""
    entry = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = entry / "snapshots" / SNAPSHOT
    write_tokenizer(bpe_gz, snapshot)
    (snapshot / "config.json").write_text(json.dumps(clip_text_config()))
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hf-home", type=Path, required=True)
    args = parser.parse_args()
    print(f"clip-l-offline: {install(args.hf_home, open_clip_bpe())}")


if __name__ == "__main__":
    main()
