"""sdagent.storage.outputs against a real S3 API: the moto server of the session fixtures."""

from __future__ import annotations

import socket
import urllib.request

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from sdagent.backends.base import Artifact
from sdagent.errors import OutputError, OutputUnavailable
from sdagent.jobs import Job
from sdagent.storage.outputs import OutputStore

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PNG = Artifact(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64, "image/png", "png", seed=1234)


def client(endpoint: str, **config):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
    )


@pytest.fixture
def s3(aws_endpoint):
    return client(aws_endpoint)


@pytest.fixture
def bucket(s3, s3_bucket) -> str:
    """``s3_bucket``, created here unless the session fixture already did."""
    try:
        s3.head_bucket(Bucket=s3_bucket)
    except ClientError:
        s3.create_bucket(Bucket=s3_bucket)
    return s3_bucket


def job() -> Job:
    return Job(job_id="job-42", model="sd_xl_base_1.0", prompt="a lighthouse", seed=-1)


def test_png_is_stored_with_content_type_cache_control_and_metadata(s3, bucket):
    [link] = OutputStore(s3, bucket, "outputs").store(job(), [PNG])

    assert (link.bucket, link.content_type, link.bytes) == (bucket, "image/png", len(PNG.data))
    assert link.key.startswith("outputs/") and link.key.endswith("/job-42/0.png")
    head = s3.head_object(Bucket=bucket, Key=link.key)
    assert head["ContentType"] == "image/png"
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert head["Metadata"] == {"job-id": "job-42", "model": "sd_xl_base_1.0", "seed": "1234", "kind": "txt2img"}


def test_presigned_link_downloads_the_bytes(s3, bucket):
    [link] = OutputStore(s3, bucket, "outputs", url_ttl_s=300).store(job(), [PNG])

    with urllib.request.urlopen(link.url, timeout=10) as response:
        assert response.read() == PNG.data
        assert response.headers["Content-Type"] == "image/png"


def test_output_over_the_threshold_is_uploaded_in_parts(s3, bucket):
    video = Artifact(bytes(range(256)) * (6 * MiB // 256), "video/mp4", "mp4", seed=5)
    store = OutputStore(s3, bucket, "outputs", multipart_threshold=5 * MiB)

    [link] = store.store(job(), [video])

    head = s3.head_object(Bucket=bucket, Key=link.key)
    assert head["ETag"].strip('"').endswith("-2")  # a multipart ETag counts its parts: 5 + 1 MiB
    assert head["ContentType"] == "video/mp4"
    assert head["Metadata"]["seed"] == "5"
    assert s3.get_object(Bucket=bucket, Key=link.key)["Body"].read() == video.data


@pytest.mark.parametrize("size", [1024, 6 * MiB], ids=["put", "multipart"])
def test_missing_bucket_is_a_permanent_error(s3, size):
    artifact = Artifact(b"\0" * size, "image/png", "png")
    store = OutputStore(s3, "no-such-bucket-sdagent", "outputs", multipart_threshold=5 * MiB)

    with pytest.raises(OutputError, match="NoSuchBucket") as raised:
        store.store(job(), [artifact])
    assert not isinstance(raised.value, OutputUnavailable)


def test_unreachable_endpoint_is_transient():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s3 = client(f"http://127.0.0.1:{port}", connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 1})

    with pytest.raises(OutputUnavailable, match="transiently"):
        OutputStore(s3, "bucket", "outputs").store(job(), [PNG])
