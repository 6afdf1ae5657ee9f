# Default values for every variable in variables.pkr.hcl. Build with
#   packer build -var-file=defaults.pkrvars.hcl -var agent_wheel=../dist/sdagent-0.1.0-py3-none-any.whl \
#     -var webui_bundle=../dist/webui-a1111.tar.gz .
# and override per build with -var or a second -var-file (docs/packaging.md).

aws_region      = "us-east-1"
ami_regions     = []
ami_users       = []
ami_name_prefix = "sdagent"
# The cheapest NVIDIA type the fleet runs (T4): validate.sh needs a GPU, the build needs no more.
instance_type     = "g4dn.xlarge"
subnet_id         = ""
security_group_id = ""
ssh_username      = "ubuntu"

# AWS Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04): NVIDIA driver, CUDA toolkit,
# nvidia-persistenced, the EFA stack, patched monthly by AWS; supports g4dn, g5, g6 (docs/packaging.md).
source_ami_name_filter = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
source_ami_owner       = "amazon"

root_volume_size_gb = 120
root_volume_type    = "gp3"
encrypt_boot        = true
kms_key_id          = ""

agent_wheel  = "../dist/sdagent-0.1.0-py3-none-any.whl"
agent_python = "3.11"
uv_version   = "0.13.9"

webui = "a1111"
# Made by packer/make-webui-bundle.sh from the tree at webui_revision (docs/packaging.md).
webui_bundle = "../dist/webui-a1111.tar.gz"
# Pinned commits, never a branch or tag; bump together with the backends' tests (docs/packaging.md).
webui_revision = {
  a1111   = "82a973c04367123ae98bd9abdf80d9eda9b910e2" # tag v1.10.1
  comfyui = "a125cd84b054a57729b5eecab930ca9408719832" # version 0.3.64 (comfyui_version.py)
}
# A1111 1.10 supports Python 3.10 only; ComfyUI runs on 3.11 like the agent.
webui_python = {
  a1111   = "3.10"
  comfyui = "3.11"
}

cloudwatch_agent_url    = "https://amazoncloudwatch-agent.s3.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb"
cloudwatch_agent_config = "../cloudwatch/agent.json"

models_s3_uri        = ""
iam_instance_profile = ""
