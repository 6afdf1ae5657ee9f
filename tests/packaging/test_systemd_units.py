"""The units as systemd itself reads them: `systemd-analyze verify` and `security --offline`.

Verify checks that every ExecStart= binary exists, and /opt/sdagent/bin/sdagent or
/usr/bin/nvidia-modprobe do not exist on a build machine. So the units are verified against a
temporary root laid out like the image: the host's own units (for targets such as
network-online.target), systemd/rootfs copied in as packer copies it, the backend drop-ins placed
as install-units.sh places them, and an executable stub at each ExecStart= path that is not part of
systemd/rootfs. `--root=` makes systemd-analyze resolve unit files, drop-ins and executables in it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.packaging.conftest import ROOTFS, run

UNITS = ["sdagent.service", "sdagent-webui.service", "sdagent-nvme.service", "sdagent-gateway.service"]
UNIT_DIR = ROOTFS / "etc" / "systemd" / "system"
HOST_UNITS = Path("/usr/lib/systemd/system")
# Installed by the base AMI or the venv, not by systemd/rootfs.
STUB_EXECUTABLES = ["opt/sdagent/bin/sdagent", "usr/bin/nvidia-modprobe"]
MAX_EXPOSURE = 2.5
MAX_NVME_EXPOSURE = 4.0  # was 7.8 before its capabilities were bounded
ORDERING = ("After=", "Before=", "Wants=", "Requires=", "BindsTo=", "PartOf=", "Requisite=")


def image_root(tmp_path: Path, backend: str) -> Path:
    root = tmp_path / f"root-{backend}"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copytree(ROOTFS, root, dirs_exist_ok=True)
    system = root / "etc/systemd/system"
    # install-units.sh links these; copies here, as an absolute link would leave the temporary root.
    backend_dir = root / "usr/share/sdagent/backends" / backend
    shutil.copy(backend_dir / "webui.conf", system / "sdagent-webui.service.d/00-backend.conf")
    shutil.copy(backend_dir / "agent.conf", system / "sdagent.service.d/00-backend.conf")
    for stub in STUB_EXECUTABLES:
        path = root / stub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    return root


@pytest.mark.parametrize("backend", ["a1111", "comfyui"])
def test_units_verify_clean_with_each_backend(systemd_analyze, tmp_path, backend):
    root = image_root(tmp_path, backend)
    result = run([systemd_analyze, "verify", "--man=no", f"--root={root}", *UNITS])
    output = (result.stdout + result.stderr).strip()
    # Verify exits 0 on warnings such as an unknown key; a clean unit prints nothing at all.
    assert result.returncode == 0 and output == "", f"systemd-analyze verify:\n{output}"


def test_verify_would_catch_a_missing_executable(systemd_analyze, tmp_path):
    root = image_root(tmp_path, "a1111")
    (root / "opt/sdagent/bin/sdagent").unlink()
    result = run([systemd_analyze, "verify", "--man=no", f"--root={root}", "sdagent.service"])
    assert result.returncode != 0
    assert "/opt/sdagent/bin/sdagent" in result.stderr


def exposure(systemd_analyze: str, root: Path, unit: str) -> tuple[float, str]:
    result = run([systemd_analyze, "security", "--offline=true", f"--root={root}", "--no-pager", unit])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), result.stdout


@pytest.mark.parametrize("unit", ["sdagent.service", "sdagent-webui.service", "sdagent-gateway.service"])
def test_services_exposure_is_ok(systemd_analyze, tmp_path, unit):
    score, report = exposure(systemd_analyze, image_root(tmp_path, "a1111"), unit)
    print(f"{unit}: exposure {score}")
    assert score <= MAX_EXPOSURE, f"{unit} exposure {score} > {MAX_EXPOSURE}:\n{report}"


def test_the_nvme_unit_keeps_only_what_preparing_a_disk_needs(systemd_analyze, tmp_path):
    """Root in the host's mount namespace (its mount must be seen by every unit), so it cannot
    score like the others; every capability it keeps is named and commented in the unit."""
    score, report = exposure(systemd_analyze, image_root(tmp_path, "a1111"), "sdagent-nvme.service")
    print(f"sdagent-nvme.service: exposure {score}")
    assert score <= MAX_NVME_EXPOSURE, report
    unit = (UNIT_DIR / "sdagent-nvme.service").read_text()
    (bounding,) = [line for line in unit.splitlines() if line.startswith("CapabilityBoundingSet=")]
    kept = bounding.split("=", 1)[1].split()
    assert kept == ["CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"]
    assert all(f"#   {capability}" in unit for capability in kept)


def test_hardening_is_what_scores_the_agent(systemd_analyze, tmp_path):
    """Without its hardening drop-in the agent is exposed: the drop-in is really read."""
    root = image_root(tmp_path, "a1111")
    (root / "etc/systemd/system/sdagent.service.d/10-hardening.conf").unlink()
    score, _ = exposure(systemd_analyze, root, "sdagent.service")
    assert score > 5.0


def unit_files() -> list[Path]:
    return sorted(UNIT_DIR.glob("*.service"))


def drop_ins() -> list[Path]:
    return sorted(UNIT_DIR.glob("*.service.d/*.conf")) + sorted(ROOTFS.glob("usr/share/sdagent/backends/*/*.conf"))


@pytest.mark.parametrize("unit", unit_files(), ids=lambda path: path.name)
def test_units_are_documented_and_comment_every_ordering_edge(unit):
    lines = unit.read_text().splitlines()
    assert any(line.startswith("Documentation=") for line in lines), f"{unit.name} has no Documentation="
    for number, line in enumerate(lines):
        if line.startswith(ORDERING):
            above = number - 1
            while above >= 0 and lines[above].startswith(ORDERING):
                above -= 1
            assert above >= 0 and lines[above].startswith("#"), f"{unit.name}:{number + 1} {line!r} has no why-comment"


@pytest.mark.parametrize("drop_in", drop_ins(), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_drop_ins_are_named_by_purpose_and_say_why(drop_in):
    if drop_in.parent.parent.name != "backends":
        assert re.fullmatch(r"\d\d-[a-z][a-z0-9-]*\.conf", drop_in.name), drop_in.name
    assert drop_in.read_text().startswith("# Why:"), f"{drop_in} does not start with a '# Why:' comment"


def test_stop_timeout_fits_the_spot_warning_and_covers_the_drain():
    from sdagent.agent.config import AgentConfig

    unit = (UNIT_DIR / "sdagent.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    drain = AgentConfig().drain_timeout_s
    image_config = (ROOTFS / "etc/sdagent/sdagent.toml").read_text()
    image_drain = float(re.search(r"^drain_timeout_s = (\d+)", image_config, re.M).group(1))
    assert max(drain, image_drain) < stop < 120


def test_sysusers_creates_the_service_user(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.fail("systemd-sysusers is not installed: run ci/install-packaging-tools.sh", pytrace=False)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("")
    conf = ROOTFS / "usr/lib/sysusers.d/sdagent.conf"
    result = run([sysusers, f"--root={root}", str(conf)])
    assert result.returncode == 0, result.stderr
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^sdagent:x:\d+:\d+:.*:/var/lib/sdagent:/usr/sbin/nologin$", passwd, re.M), passwd


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file, values by key (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_a_crashed_agent_is_started_again_and_a_bad_config_is_not():
    """A segfault (librdkafka's, say) is an unclean signal: Restart=on-failure starts the agent
    again; the jobs it held go back to the group (at-least-once). Exit 64/78 (usage, config) never
    get better by retrying."""
    settings = unit_settings(UNIT_DIR / "sdagent.service")
    assert settings["Restart"] == ["on-failure"]
    prevented = " ".join(settings.get("RestartPreventExitStatus", [])).split()
    assert set(prevented) == {"64", "78"} and "SIGSEGV" not in prevented and "SIGABRT" not in prevented
