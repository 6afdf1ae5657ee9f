"""Output keys, their rejections, link signing and error mapping of sdagent.storage.outputs; no network."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from sdagent.backends.base import Artifact
from sdagent.errors import ConfigError, OutputError, OutputUnavailable
from sdagent.jobs import Job, OutputSpec
from sdagent.storage.outputs import OutputStore

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
PNG = Artifact(b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "image/png", "png", seed=7)


def s3_client():
    # Building a client and presigning need no network; any call made would go through a Stubber.
    # s3v4 explicitly: left unset, botocore still presigns with SigV2 in us-east-1.
    return boto3.client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(signature_version="s3v4"),
    )


def store(prefix: str = "outputs", **kwargs) -> OutputStore:
    return OutputStore(s3_client(), "bucket", prefix, clock=lambda: NOW, **kwargs)


def job(filename: str | None = None, prefix: str | None = None, **fields) -> Job:
    fields.setdefault("model", "sd_xl_base_1.0")
    return Job(job_id="job-1", seed=42, output=OutputSpec(filename=filename, prefix=prefix), **fields)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- keys ----------------------------------------------------------------------------------------


def test_default_key_is_date_job_and_index_under_the_prefix():
    assert store().keys_for(job(), [PNG, PNG]) == [
        "outputs/2023/11/14/job-1/0.png",
        "outputs/2023/11/14/job-1/1.png",
    ]


def test_job_prefix_and_every_placeholder_render():
    template = "{model}/{date}/{job_id}-{seed}-{index}.{ext}"
    unseeded = Artifact(b"x", "image/webp", "webp")
    keys = store("/outputs/").keys_for(job(template, prefix="team-a/"), [PNG, unseeded])
    assert keys == [
        "outputs/team-a/sd_xl_base_1.0/2023/11/14/job-1-7-0.png",  # the artifact's seed...
        "outputs/team-a/sd_xl_base_1.0/2023/11/14/job-1-42-1.webp",  # ...else the job's
    ]


def test_empty_configured_prefix_gives_keys_at_the_bucket_root():
    assert store("").keys_for(job("{job_id}.{ext}"), [PNG]) == ["job-1.png"]


def test_single_artifact_needs_no_index():
    assert store().keys_for(job("{job_id}.{ext}"), [PNG]) == ["outputs/job-1.png"]


@pytest.mark.parametrize(
    "template",
    ["{user}.png", "{job_id.__class__}", "{seed!r}", "{index:03d}", "{}", "{0}", "{job_id", "a}b"],
)
def test_unknown_or_decorated_placeholder_is_rejected(template):
    with pytest.raises(OutputError, match="output.filename"):
        store().keys_for(job(template), [PNG])


@pytest.mark.parametrize(
    "template",
    [
        "../{index}.{ext}",
        "a/../../{index}.{ext}",
        "./{index}.{ext}",
        "/abs/{index}.{ext}",
        "a\\..\\{index}.{ext}",
        "a//{index}.{ext}",
        "{index}.{ext}/",
        "a/{index}\n.{ext}",
        "a/{index}\x7f.{ext}",
    ],
)
def test_template_escaping_the_prefix_is_rejected(template):
    with pytest.raises(OutputError, match="invalid"):
        store().keys_for(job(template), [PNG])


def test_job_prefix_with_dot_dot_is_rejected():
    with pytest.raises(OutputError, match=r"'\.\.'"):
        store().keys_for(job(prefix="a/../../other-tenant"), [PNG])


def test_key_over_1024_bytes_is_rejected():
    long_prefix = "/".join(["p" * 100] * 10)  # 1009 bytes, itself a valid key; 1032 with the rest
    with pytest.raises(OutputError, match="1024"):
        store(long_prefix).keys_for(job(), [PNG])


def test_key_of_multibyte_characters_is_measured_in_bytes():
    template = "é" * 240 + "{index}.{ext}"  # 534 characters in all, but 1054 bytes
    with pytest.raises(OutputError, match="1024"):
        store("outputs/" + "é" * 280).keys_for(job(template), [PNG])


def test_several_artifacts_without_index_are_rejected():
    with pytest.raises(OutputError, match="index"):
        store().keys_for(job("{job_id}-{seed}.{ext}"), [PNG, PNG])


def test_bad_template_uploads_nothing():
    client = s3_client()
    with Stubber(client):  # no responses queued: any S3 call would fail the test
        with pytest.raises(OutputError, match="index"):
            OutputStore(client, "bucket", "outputs").store(job("{job_id}.{ext}"), [PNG, PNG])


# --- links ---------------------------------------------------------------------------------------


def test_cloudfront_url_quotes_the_key():
    url = store(cloudfront_domain="cdn.example.com").url_for("outputs/my model+v2/0.png")
    assert url == "https://cdn.example.com/outputs/my%20model%2Bv2/0.png"


def test_signed_cloudfront_url_verifies_with_the_public_key(rsa_key):
    signed = store(
        cloudfront_domain="cdn.example.com",
        cloudfront_key_id="K2JCJMDEHXQW5F",
        cloudfront_private_key_pem=pem(rsa_key),
        url_ttl_s=3600,
    )
    url = signed.url_for("outputs/2023/11/14/job-1/0.png")

    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    assert set(query) == {"Expires", "Signature", "Key-Pair-Id"}
    assert query["Key-Pair-Id"] == "K2JCJMDEHXQW5F"
    assert int(query["Expires"]) == int(NOW) + 3600
    resource = f"{parts.scheme}://{parts.netloc}{parts.path}"
    assert resource == "https://cdn.example.com/outputs/2023/11/14/job-1/0.png"

    # The canned policy as CloudFront rebuilds it, whitespace-free, in this exact order (AWS docs:
    # "Create a signed URL using a canned policy").
    expires = query["Expires"]
    policy = f'{{"Statement":[{{"Resource":"{resource}","Condition":{{"DateLessThan":{{"AWS:EpochTime":{expires}}}}}}}]}}'.encode()
    signature = base64.b64decode(query["Signature"].translate(str.maketrans("-_~", "+=/")))
    rsa_key.public_key().verify(signature, policy, padding.PKCS1v15(), hashes.SHA1())
    with pytest.raises(InvalidSignature):
        rsa_key.public_key().verify(signature, policy.replace(b"0.png", b"1.png"), padding.PKCS1v15(), hashes.SHA1())


def test_without_cloudfront_the_link_is_a_presigned_s3_url():
    url = store(url_ttl_s=600).url_for("outputs/a b.png")
    query = parse_qs(urlsplit(url).query)
    assert urlsplit(url).path.endswith("/outputs/a%20b.png")
    assert query["X-Amz-Expires"] == ["600"]
    assert "X-Amz-Signature" in query


def test_cloudfront_key_id_without_a_private_key_is_a_config_error():
    with pytest.raises(ConfigError):
        store(cloudfront_domain="cdn.example.com", cloudfront_key_id="K2JCJMDEHXQW5F")


def test_non_rsa_cloudfront_key_is_a_config_error():
    with pytest.raises(ConfigError, match="RSA"):
        store(
            cloudfront_domain="cdn.example.com",
            cloudfront_key_id="K2JCJMDEHXQW5F",
            cloudfront_private_key_pem=pem(ec.generate_private_key(ec.SECP256R1())),
        )


def test_presigned_s3_url_cannot_outlive_seven_days():
    with pytest.raises(ConfigError, match="url_ttl_s"):
        store(url_ttl_s=8 * 24 * 3600)


# --- error mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("Throttling", 400, True),
        ("RequestTimeout", 400, True),
        ("AccessDenied", 403, False),
        ("NoSuchBucket", 404, False),
        ("InvalidArgument", 400, False),
    ],
)
def test_s3_errors_map_to_transient_or_permanent(code, status, transient):
    client = s3_client()
    with Stubber(client) as stub:
        stub.add_client_error("put_object", service_error_code=code, http_status_code=status)
        with pytest.raises(OutputError, match=code) as raised:
            OutputStore(client, "bucket", "outputs").store(job(), [PNG])
    assert isinstance(raised.value, OutputUnavailable) is transient
