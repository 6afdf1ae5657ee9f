import pytest

from sdagent.config import load_settings
from sdagent.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "sdagent.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file():
    settings = load_settings()
    assert settings.kafka.group_protocol == "consumer"
    assert settings.kafka.static_membership is False


def test_file_values_are_read(tmp_path):
    settings = load_settings(write(tmp_path, '[kafka]\nbootstrap_servers = "b:9092"\n[limits]\nmax_width = 1024\n'))
    assert settings.kafka.bootstrap_servers == "b:9092"
    assert settings.limits.max_width == 1024


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SDAGENT_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    settings = load_settings(write(tmp_path, '[kafka]\nbootstrap_servers = "file:9092"\n'))
    assert settings.kafka.bootstrap_servers == "env:9092"


@pytest.mark.parametrize(
    "text, key",
    [
        ('[kafka]\ngroup_protocol = "eager"\n', "kafka.group_protocol"),
        ("[kafka]\nbootstrap = 1\n", "kafka.bootstrap"),
        ("[limits]\nmax_width = -5\n", "limits.max_width"),
        ('[topics]\njobs = "a"\nresults = "a"\n', "topics"),
        ('[outputs]\ncloudfront_key_id = "K1"\n', "outputs"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ('[cache]\nsource = "models"\n', "cache.source"),
        ('[cache]\nsource = "http://store/models"\n', "cache.source"),
        ('[cache]\nsource = "s3://"\n', "cache.source"),
        ('[cache]\nsource = "/srv/models"\nbudget_bytes = 0\n', "cache.budget_bytes"),
        ('[cache]\nsource = "/srv/models"\nmultipart_chunksize_bytes = 1024\n', "cache.multipart_chunksize_bytes"),
        ('[cache]\nprewarm = ["sd15.safetensors"]\n', "cache.prewarm"),  # nothing to prewarm from
        ("[cache]\nprewarm_most_used = 5\n", "cache.prewarm_most_used"),
        (
            '[cache]\nsource = "s3://bucket/m"\nendpoint_url = "http://127.0.0.1:9000"\ntransfer_client = "crt"\n',
            "cache.transfer_client",
        ),
        ('[cache]\nsource = "/srv/models"\nprewarm = "sd15"\n', "cache.prewarm"),
        ('[cache]\nsource = "/srv/models"\nsize = 1\n', "cache.size"),
        # A1111 without --server-name binds every interface: an open, unauthenticated API.
        ('[backend]\nkind = "a1111"\n[backend.process]\ncommand = ["./webui.sh", "--nowebui"]\n', "backend.process"),
    ],
)
def test_bad_value_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert caught.value.key == key


def test_bad_environment_value_names_the_key(monkeypatch):
    monkeypatch.setenv("SDAGENT_RETRY__MAX_ATTEMPTS", "many")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.key == "retry.max_attempts"


@pytest.mark.parametrize(
    "name, value, key",
    [
        ("SDAGENT_KAFKA__CLIENT_CONFIG", '{"security.protocol": SSL}', "kafka.client_config"),
        ("SDAGENT_BACKEND__MODELS", '["sd15.safetensors",', "backend.models"),
    ],
)
def test_an_environment_value_that_is_not_json_names_its_key(monkeypatch, name, value, key):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.key == key and name in str(caught.value)


def test_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[kafka\n"))


def test_command_line_overrides_beat_the_environment(monkeypatch):
    monkeypatch.setenv("SDAGENT_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    settings = load_settings(overrides={"kafka": {"bootstrap_servers": "flag:9092"}})
    assert settings.kafka.bootstrap_servers == "flag:9092"
    assert settings.kafka.group_id == "sdagent"


def test_a_cache_section_from_the_example_shape_is_accepted(tmp_path):
    settings = load_settings(
        write(
            tmp_path,
            '[cache]\nsource = "s3://models-bucket/sd"\nprewarm = ["sd15"]\n'
            "prewarm_most_used = 3\nbudget_bytes = 400_000_000_000\n",
        )
    )
    assert settings.cache.source == "s3://models-bucket/sd"
    assert settings.cache.prewarm == ["sd15"] and settings.cache.prewarm_most_used == 3


def test_environment_overrides_reach_the_fields_only_one_backend_kind_has(monkeypatch):
    # The configuration's backend field is the base class; only the kind's class knows that
    # process.command is a list and process.env a table, so their JSON text must still be read.
    monkeypatch.setenv("SDAGENT_BACKEND__KIND", "comfyui")
    monkeypatch.setenv("SDAGENT_BACKEND__PROCESS__COMMAND", '["python", "main.py", "--port", "8188"]')
    monkeypatch.setenv("SDAGENT_BACKEND__PROCESS__ENV", '{"HF_HUB_OFFLINE": "1"}')
    monkeypatch.setenv("SDAGENT_BACKEND__URL", "http://127.0.0.1:8188")
    backend = load_settings().backend
    assert backend.kind == "comfyui" and backend.url == "http://127.0.0.1:8188"
    assert backend.process.command == ["python", "main.py", "--port", "8188"]
    assert backend.process.env == {"HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "command",
    [
        '["/opt/webui/webui.sh", "--nowebui", "--server-name", "127.0.0.1"]',
        '["python", "launch.py", "--server-name=127.0.0.1"]',
        '["python", "launch.py", "--listen"]',  # every interface, on purpose
        '["/usr/local/bin/start-my-webui"]',  # an operator's wrapper sets its own flags
    ],
)
def test_an_a1111_command_that_chooses_where_it_listens_is_accepted(tmp_path, command):
    settings = load_settings(write(tmp_path, f'[backend]\nkind = "a1111"\n[backend.process]\ncommand = {command}\n'))
    assert settings.backend.process.command
