"""The one rule by which a job's model name meets the names a store, a cache or a WebUI lists."""

import pytest

from sdagent.modelnames import candidates, match_model

LISTED = ["sd15.safetensors", "styles/dreamy.safetensors", "twin.ckpt", "twin.safetensors", "plain"]


@pytest.mark.parametrize(
    "model, meant",
    [
        ("sd15.safetensors", "sd15.safetensors"),
        ("sd15", "sd15.safetensors"),
        ("styles/dreamy", "styles/dreamy.safetensors"),
        ("plain", "plain"),
        ("twin", None),  # two files with that stem: never a guess
        ("twin.ckpt", "twin.ckpt"),
        ("sd15.ckpt", None),  # another extension is another file
        ("dreamy", None),  # a folder is part of the name
        ("sd", None),
    ],
)
def test_a_name_means_itself_or_itself_with_an_extension(model, meant) -> None:
    assert match_model(model, LISTED) == meant


def test_an_ambiguous_name_lists_every_candidate() -> None:
    assert candidates("twin", LISTED) == ["twin.ckpt", "twin.safetensors"]
