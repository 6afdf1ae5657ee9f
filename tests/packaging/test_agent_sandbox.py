"""What the image gives the agent works with the agent: its configuration files load, and its
native libraries run under the unit's MemoryDenyWriteExecute=yes."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import pytest

from sdagent.config import load_settings
from tests.packaging.conftest import REPO, ROOTFS

IMAGE_CONFIG = ROOTFS / "etc/sdagent/sdagent.toml"
SAMPLE_PARAMETERS = {
    "KafkaBootstrapServers": "b-1.example:9098,b-2.example:9098",
    "ConsumerGroup": "sdagent",
    "JobsTopic": "sdagent.jobs",
    "Consumption": "share",
    "OutputsBucket": "example-outputs",
    "OutputsPrefix": "outputs",
    "AWS::Region": "us-east-1",
    "AWS::StackName": "sdagent-prod",
    "KafkaClientConfig": 'SDAGENT_KAFKA__CLIENT_CONFIG={"security.protocol": "SSL"}',
    "CloudFront": "SDAGENT_OUTPUTS__CLOUDFRONT_DOMAIN=d111111abcdef8.cloudfront.net",
}


def unit_environment(drop_in) -> dict[str, str]:
    return dict(re.findall(r"^Environment=([A-Z0-9_]+)=(.*)$", drop_in.read_text(), re.M))


def site_env_from_fleet_user_data() -> dict[str, str]:
    """The site.env the fleet's launch template writes, with sample parameter values."""
    text = (REPO / "fleet/fleet.yaml").read_text()
    block = text.split("path: /etc/sdagent/site.env", 1)[1].split("- KafkaClientConfig", 1)[0]
    env = {}
    for line in block.splitlines():
        line = line.strip()
        for name, value in SAMPLE_PARAMETERS.items():
            line = line.replace("${" + name + "}", value)
        if line.startswith("SDAGENT_"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize("backend", ["a1111", "comfyui"])
def test_image_config_loads_with_the_backend_and_site_environment(monkeypatch, backend):
    for key in [key for key in os.environ if key.startswith("SDAGENT_")]:
        monkeypatch.delenv(key)
    environment = {
        **unit_environment(ROOTFS / f"usr/share/sdagent/backends/{backend}/agent.conf"),
        **site_env_from_fleet_user_data(),
    }
    assert "SDAGENT_LIFECYCLE__AUTOSCALING_GROUP" in environment
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(IMAGE_CONFIG)
    assert settings.backend.kind == backend
    assert settings.backend.process.command is None  # the WebUI has its own unit
    assert settings.kafka.bootstrap_servers == SAMPLE_PARAMETERS["KafkaBootstrapServers"]
    assert settings.kafka.client_config == {"security.protocol": "SSL"}
    assert settings.outputs.cloudfront_domain == "d111111abcdef8.cloudfront.net"
    assert settings.lifecycle.autoscaling_group == "sdagent-prod-spot"
    assert settings.lifecycle.launch_hook == "sdagent-launch"


CHILD = r"""
import ctypes, importlib, io, pkgutil, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE failed: errno {ctypes.get_errno()}")
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("the rule is not in force: a writable-executable mapping was allowed")
except PermissionError:
    pass
import sdagent
for module in pkgutil.walk_packages(sdagent.__path__, "sdagent."):
    if ".devstack" not in module.name and not module.name.endswith("__main__"):
        importlib.import_module(module.name)
from PIL import Image
Image.new("RGB", (64, 64), "red").save(io.BytesIO(), "PNG")
Image.new("RGB", (64, 64), "red").save(io.BytesIO(), "WEBP")
import av
out = io.BytesIO()
with av.open(out, "w", format="mp4") as container:
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    for _ in range(4):
        for packet in stream.encode(av.VideoFrame.from_image(Image.new("RGB", (64, 64), "blue"))):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
rsa.generate_private_key(public_exponent=65537, key_size=2048).sign(b"x", padding.PKCS1v15(), hashes.SHA1())
import confluent_kafka
producer = confluent_kafka.Producer({"bootstrap.servers": "127.0.0.1:9", "log_level": 0})
producer.poll(0.2)
import boto3
boto3.client("s3", region_name="us-east-1").generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
assert callback(1) == 2
print("ok")
"""


def kernel_has_mdwe() -> bool:
    # PR_GET_MDWE (66) exists from Linux 6.3; older kernels answer EINVAL.
    return ctypes.CDLL(None, use_errno=True).prctl(66, 0, 0, 0, 0) >= 0


@pytest.mark.skipif(not kernel_has_mdwe(), reason="kernel < 6.3 has no PR_SET_MDWE to emulate MemoryDenyWriteExecute")
def test_agent_libraries_run_under_memory_deny_write_execute():
    """PR_SET_MDWE is the kernel's form of MemoryDenyWriteExecute=: the agent's native code
    (librdkafka, Pillow, PyAV, cryptography, ctypes callbacks) must not need W+X memory."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
