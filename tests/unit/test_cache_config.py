"""``[cache]`` problems are refused at start-up (and by ``sdagent check-config``) naming the key."""

import pytest

from sdagent.config import load_settings
from sdagent.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "sdagent.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key",
    [
        ('[cache]\nsource = "models"\n', "cache.source"),
        ('[cache]\nsource = "http://store/models"\n', "cache.source"),
        ('[cache]\nsource = "s3://"\n', "cache.source"),
        ('[cache]\nsource = "/srv/models"\nbudget_bytes = 0\n', "cache.budget_bytes"),
        ('[cache]\nsource = "/srv/models"\nmultipart_chunksize_bytes = 1024\n', "cache.multipart_chunksize_bytes"),
        ('[cache]\nprewarm = ["sd15.safetensors"]\n', "cache.prewarm"),  # nothing to prewarm from
        ("[cache]\nprewarm_most_used = 5\n", "cache.prewarm_most_used"),
        ('[cache]\nsource = "s3://bucket/m"\nendpoint_url = "http://127.0.0.1:9000"\ntransfer_client = "crt"\n',
         "cache.transfer_client"),
        ('[cache]\nsource = "/srv/models"\nprewarm = "sd15"\n', "cache.prewarm"),
        ('[cache]\nsource = "/srv/models"\nsize = 1\n', "cache.size"),
    ],
)
def test_a_bad_cache_value_names_its_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert raised.value.key == key


def test_a_cache_section_from_the_example_shape_is_accepted(tmp_path):
    settings = load_settings(write(tmp_path, '[cache]\nsource = "s3://models-bucket/sd"\nprewarm = ["sd15"]\n'
                                             "prewarm_most_used = 3\nbudget_bytes = 400_000_000_000\n"))
    assert settings.cache.source == "s3://models-bucket/sd"
    assert settings.cache.prewarm == ["sd15"] and settings.cache.prewarm_most_used == 3
