"""prepare-nvme run for real against a fake sysfs, with mdadm, blkid, mkfs.xfs, mount, mountpoint
and chown replaced on PATH by stubs that record their arguments (the style of amazon-eks-ami's
script tests)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import ROOTFS

SCRIPT = ROOTFS / "usr/libexec/sdagent/prepare-nvme"
INSTANCE_STORE = "Amazon EC2 NVMe Instance Storage        "  # sysfs pads the model with spaces
EBS = "Amazon Elastic Block Store              "

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0")" in
  mountpoint) [[ -e "$STUB_STATE/mounted" ]] && exit 0 || exit 1 ;;
  mount) touch "$STUB_STATE/mounted" ;;
  blkid) [[ -e "$STUB_STATE/has-fs" ]] && echo xfs; exit 0 ;;
  mkfs.xfs) touch "$STUB_STATE/has-fs" ;;
  mdadm) [[ "$1" == --assemble && ! -e "$STUB_STATE/array" ]] && exit 1; touch "$STUB_STATE/array" ;;
esac
exit 0
"""


class Host:
    """A fake instance: sysfs disks, stub commands, and the log of what the script ran."""

    def __init__(self, tmp_path: Path) -> None:
        self.sysfs = tmp_path / "sys"
        self.dev = tmp_path / "dev"
        self.mount_point = tmp_path / "var/cache/sdagent/models"
        self.state = tmp_path / "state"
        self.log = tmp_path / "stub.log"
        self.bin = tmp_path / "bin"
        for directory in (self.sysfs / "block", self.dev / "md", self.state, self.bin):
            directory.mkdir(parents=True)
        for name in ("mdadm", "blkid", "mkfs.xfs", "mount", "mountpoint", "chown"):
            stub = self.bin / name
            stub.write_text(STUB)
            stub.chmod(0o755)

    def disk(self, name: str, model: str) -> None:
        device = self.sysfs / "block" / name / "device"
        device.mkdir(parents=True)
        (device / "model").write_text(model + "\n")

    def run(self) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        env = {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "STUB_LOG": str(self.log),
            "STUB_STATE": str(self.state),
            "SDAGENT_NVME_SYSFS": str(self.sysfs),
            "SDAGENT_NVME_DEV_DIR": str(self.dev),
            "SDAGENT_NVME_MOUNT_POINT": str(self.mount_point),
        }
        result = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def ran(self) -> list[str]:
        return [line.replace(str(self.dev), "/dev") for line in self.log.read_text().splitlines()]


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


def test_one_instance_store_disk_is_formatted_and_mounted(host):
    host.disk("nvme0n1", EBS)
    host.disk("nvme1n1", INSTANCE_STORE)
    host.run()
    ran = host.ran()
    assert "mkfs.xfs -q -K -L sdagent-cache /dev/nvme1n1" in ran
    assert any(line.startswith("mount -o noatime,nodev,nosuid,noexec /dev/nvme1n1 ") for line in ran)
    assert not any(line.startswith("mdadm") for line in ran)
    assert any(line.startswith("chown sdagent:sdagent ") for line in ran)


def test_several_disks_become_one_raid0(host):
    host.disk("nvme1n1", INSTANCE_STORE)
    host.disk("nvme2n1", INSTANCE_STORE)
    host.run()
    ran = host.ran()
    assert "mdadm --create /dev/md/sdagent-cache --run --level=0 --raid-devices=2 /dev/nvme1n1 /dev/nvme2n1" in ran
    assert "mkfs.xfs -q -K -L sdagent-cache /dev/md/sdagent-cache" in ran


def test_a_second_run_finds_the_mount_and_does_nothing(host):
    host.disk("nvme1n1", INSTANCE_STORE)
    host.run()
    result = host.run()
    assert "already mounted" in result.stdout
    assert [line.split()[0] for line in host.ran()] == ["mountpoint"]


def test_after_a_reboot_the_file_system_is_kept(host):
    host.disk("nvme1n1", INSTANCE_STORE)
    (host.state / "has-fs").touch()  # the store survived a reboot, the mount did not
    host.run()
    ran = host.ran()
    assert not any(line.startswith("mkfs") for line in ran)
    assert any(line.startswith("mount ") for line in ran)


def test_after_a_stop_start_the_blank_store_is_formatted_again(host):
    host.disk("nvme1n1", INSTANCE_STORE)
    host.run()
    for marker in ("mounted", "has-fs"):  # a stop/start wipes the store and unmounts it
        (host.state / marker).unlink()
    host.run()
    assert any(line.startswith("mkfs.xfs") for line in host.ran())


def test_no_instance_store_leaves_the_cache_on_the_root_volume(host):
    host.disk("nvme0n1", EBS)
    result = host.run()
    assert "no instance-store disk" in result.stdout
    assert not any(line.split()[0] in {"mkfs.xfs", "mount", "mdadm"} for line in host.ran())
    assert host.mount_point.is_dir()
