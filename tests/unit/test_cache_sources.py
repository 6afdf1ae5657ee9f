"""Choices the sources make on their own: the S3 transfer client, the copy path of a directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdagent.cache import CacheError
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.sources.s3 import is_default_endpoint, resolve_transfer_client


@pytest.mark.parametrize(
    ("preference", "crt_installed", "default_endpoint", "chosen"),
    [
        ("auto", True, True, "crt"),
        ("auto", False, True, "classic"),
        ("auto", True, False, "classic"),  # the CRT client would ignore the custom endpoint
        ("classic", True, True, "classic"),
    ],
)
def test_the_crt_transfer_client_is_used_when_installed_and_on_the_default_endpoint(
    preference, crt_installed, default_endpoint, chosen
):
    assert resolve_transfer_client(preference, crt_installed=crt_installed, default_endpoint=default_endpoint) == chosen


def test_the_crt_transfer_client_is_refused_with_a_custom_endpoint_or_without_awscrt():
    with pytest.raises(CacheError, match="boto3#4839"):
        resolve_transfer_client("crt", crt_installed=True, default_endpoint=False)
    with pytest.raises(CacheError, match="awscrt"):
        resolve_transfer_client("crt", crt_installed=False, default_endpoint=True)


def test_default_endpoint_is_told_from_a_custom_one():
    import boto3

    def client(**options):
        return boto3.client("s3", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x", **options)

    assert is_default_endpoint(client())
    assert not is_default_endpoint(client(endpoint_url="https://bucket.vpce-1a2b.s3.eu-west-1.vpce.amazonaws.com"))
    assert not is_default_endpoint(client(endpoint_url="http://127.0.0.1:9000"))


def test_copy_mode_follows_the_store_file_system(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n"
        "90 22 0:50 / /mnt/efs rw,relatime shared:60 - nfs4 fs-123.efs.us-east-1.amazonaws.com:/ rw,vers=4.1\n"
        "91 22 0:51 / /mnt/my\\040bucket rw shared:61 - fuse.mountpoint-s3 mountpoint-s3 rw\n"
    )
    assert DirectorySource(Path("/mnt/efs/models"), mountinfo=mountinfo).copy_mode == "pread"
    assert DirectorySource(Path("/mnt/my bucket/models"), mountinfo=mountinfo).copy_mode == "pread"
    assert DirectorySource(Path("/mnt/efs-local"), mountinfo=mountinfo).copy_mode == "kernel"
    assert DirectorySource(Path("/data"), mountinfo=tmp_path / "missing").copy_mode == "pread"
