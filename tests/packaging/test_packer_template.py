"""packer/ through the real packer and its amazon plugin (ci/install-packaging-tools.sh).

`packer validate` here checks HCL syntax, every variable's type and validation, the amazon-ebs
source against the plugin's schema (an unknown or mistyped field fails) and that every file a file
provisioner uploads exists. It cannot check what needs AWS: that the source_ami_filter finds an
AMI, that the region, subnet, instance type or profile exist, or that the provisioners succeed on
the base AMI; docs/packaging.md says how a real build covers those.
"""

from __future__ import annotations

import shutil

import pytest

from tests.packaging.conftest import REPO, run

PACKER_DIR = REPO / "packer"


@pytest.fixture
def build_inputs(tmp_path):
    """Stand-ins for the build's inputs that CI does not build: the wheel and cloudwatch/agent.json."""
    wheel = tmp_path / "sdagent-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    agent_json = REPO / "cloudwatch" / "agent.json"
    if not agent_json.exists():
        agent_json = tmp_path / "agent.json"
        agent_json.write_text("{}\n")
    return ["-var", f"agent_wheel={wheel}", "-var", f"cloudwatch_agent_config={agent_json}"]


def validate(packer, packer_env, *args):
    return run([packer, "validate", "-var-file=defaults.pkrvars.hcl", *args, "."], cwd=PACKER_DIR, env=packer_env)


@pytest.mark.parametrize("webui", ["a1111", "comfyui"])
def test_template_validates_with_the_amazon_plugin(packer, packer_env, build_inputs, webui):
    result = validate(packer, packer_env, *build_inputs, "-var", f"webui={webui}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The configuration is valid." in result.stdout


def test_an_unknown_webui_is_rejected(packer, packer_env, build_inputs):
    result = validate(packer, packer_env, *build_inputs, "-var", "webui=invokeai")
    assert result.returncode != 0
    assert 'must be "a1111" or "comfyui"' in result.stdout + result.stderr


def test_a_mistyped_builder_field_is_rejected(packer, packer_env, build_inputs, tmp_path):
    """The plugin's schema is really applied (no plugin: validate fails on 'Missing plugins')."""
    copy = tmp_path / "packer"
    shutil.copytree(PACKER_DIR, copy)
    template = copy / "sdagent.pkr.hcl"
    template.write_text(template.read_text().replace("ssh_pty              = true", "ssh_ptyy = true"))
    (tmp_path / "systemd").symlink_to(REPO / "systemd")
    (tmp_path / "docs").symlink_to(REPO / "docs")
    result = run([packer, "validate", "-var-file=defaults.pkrvars.hcl", *build_inputs, "."], cwd=copy, env=packer_env)
    assert result.returncode != 0
    assert "Unsupported argument" in result.stdout + result.stderr


def test_template_is_formatted(packer, packer_env):
    result = run([packer, "fmt", "-check", "-diff", "."], cwd=PACKER_DIR, env=packer_env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_variable_has_a_default_value_and_a_description():
    import re

    variables = (PACKER_DIR / "variables.pkr.hcl").read_text()
    declared = re.findall(r'^variable "([a-z0-9_]+)"', variables, re.M)
    defaults = set(re.findall(r"^([a-z0-9_]+)\s*=", (PACKER_DIR / "defaults.pkrvars.hcl").read_text(), re.M))
    assert set(declared) == defaults
    assert variables.count("description =") == len(declared)
    for template in PACKER_DIR.glob("*.pkr.hcl"):
        if template.name != "variables.pkr.hcl":
            assert 'variable "' not in template.read_text(), f"{template.name} declares a variable"
