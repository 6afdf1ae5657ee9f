"""The image build's CLIP ViT-L/14 text config and tokenizer, made from open_clip's BPE vocabulary,
load offline in A1111's interpreter and tokenize as CLIP does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conformance.conftest import OFFLINE, REPO

SCRIPT = REPO / "packer/provisioners/clip-l-offline.py"
# transformers, as A1111's FrozenCLIPEmbedder asks for them: by hub id, offline.
CHECK = """
from transformers import CLIPTextConfig, CLIPTokenizer
tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")
config = CLIPTextConfig.from_pretrained("openai/clip-vit-large-patch14")
import json
print(json.dumps({"ids": tokenizer("a photo of a cat")["input_ids"], "width": config.hidden_size,
                  "layers": config.num_hidden_layers, "vocab": len(tokenizer)}))
"""


def test_the_sd1_text_encoders_tokenizer_comes_from_a_pypi_package_and_loads_offline(webuis, tmp_path: Path) -> None:
    python = str(webuis["a1111"].python)
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf-home"), "PATH": "/usr/bin:/bin"}
    subprocess.run([python, str(SCRIPT), "--hf-home", str(tmp_path / "hf-home")], check=True, env=env, timeout=120)
    loaded = subprocess.run([python, "-c", CHECK], check=True, env=env, timeout=120, capture_output=True, text=True)
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    # CLIP's own ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert facts == {"ids": [49406, 320, 1125, 539, 320, 2368, 49407], "width": 768, "layers": 12, "vocab": 49408}
