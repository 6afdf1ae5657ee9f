"""packer/ through the real packer and its amazon plugin (ci/install-packaging-tools.sh).

`packer validate` here checks HCL syntax, every variable's type and validation, the amazon-ebs
source against the plugin's schema (an unknown or mistyped field fails) and that every file a file
provisioner uploads exists. It cannot check what needs AWS: that the source_ami_filter finds an
AMI, that the region, subnet, instance type or profile exist, or that the provisioners succeed on
the base AMI; docs/packaging.md says how a real build covers those.
"""

from __future__ import annotations

import re
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
    bundle = tmp_path / "webui.tar.gz"
    bundle.write_bytes(b"")
    (tmp_path / "webui.tar.gz.sha256").write_text("")
    return ["-var", f"agent_wheel={wheel}", "-var", f"cloudwatch_agent_config={agent_json}",
            "-var", f"webui_bundle={bundle}"]  # fmt: skip


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


def test_a_revision_that_is_not_a_full_commit_is_rejected(packer, packer_env, build_inputs):
    result = validate(packer, packer_env, *build_inputs, "-var", 'webui_revision={a1111 = "v1.10.1", comfyui = "main"}')
    assert result.returncode != 0
    assert "full 40-hex commit SHA" in result.stdout + result.stderr


def test_the_build_downloads_nothing_but_pinned_packages():
    """No clone, no GitHub or Hugging Face hub fetch, no prepare_environment() (which does both)."""
    import re

    scripts = {path.name: path.read_text() for path in (PACKER_DIR / "provisioners").iterdir()}
    forbidden = re.compile(
        r"git clone|git fetch|github\.com|huggingface\.co|from_pretrained|prepare_environment|hf_hub_download"
    )
    found = {name: forbidden.findall(text) for name, text in scripts.items() if forbidden.search(text)}
    assert found == {}
    # pip installs only from a lock file, nothing named loose
    command_lines = scripts["install-webui.sh"].replace("\\\n", " ").splitlines()
    installs = [line for line in command_lines if "uv pip install" in line]
    assert installs and all("--no-deps" in line and "-r " in line for line in installs)


@pytest.mark.parametrize("webui", ["a1111", "comfyui"])
def test_each_lock_pins_every_package_to_one_version_from_an_index(webui):
    lines = [line for line in (PACKER_DIR / "locks" / f"{webui}.txt").read_text().splitlines()
             if line and not line.startswith("#")]  # fmt: skip
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+!\-]*", line) for line in lines), [
        line for line in lines if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+!\-]*", line)
    ]
    names = [line.split("==")[0].lower() for line in lines]
    assert "torch" in names and len(names) == len(set(names))


def test_a_webui_bundle_is_reproducible_and_checked(tmp_path):
    """make-webui-bundle.sh packs a tree the same way twice; an A1111 tree must carry its repositories."""
    import subprocess

    tree = tmp_path / "a1111"
    for repository in ("stable-diffusion-stability-ai", "generative-models", "k-diffusion", "BLIP",
                       "stable-diffusion-webui-assets"):  # fmt: skip
        (tree / "repositories" / repository).mkdir(parents=True)
        (tree / "repositories" / repository / "README").write_text(repository)
    (tree / "launch.py").write_text("# A1111")
    script = PACKER_DIR / "make-webui-bundle.sh"
    digests = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}" / "webui-a1111.tar.gz"
        subprocess.run(["bash", str(script), "a1111", str(tree), str(out)], check=True, capture_output=True)
        digests.append((out.parent / "webui-a1111.tar.gz.sha256").read_text().split()[0])
        subprocess.run(["sha256sum", "--check", "--strict", out.name + ".sha256"], cwd=out.parent, check=True)
    assert digests[0] == digests[1]
    (tree / "repositories" / "BLIP" / "README").unlink()
    (tree / "repositories" / "BLIP").rmdir()
    refused = subprocess.run(["bash", str(script), "a1111", str(tree), str(tmp_path / "x.tar.gz")],
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 1 and "repositories/BLIP is missing" in refused.stderr
