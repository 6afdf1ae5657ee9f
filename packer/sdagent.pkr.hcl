# The sdagent GPU AMI: AWS's Deep Learning Base GPU AMI (NVIDIA driver, CUDA) plus the agent, one
# WebUI at a pinned commit, the CloudWatch agent, the systemd units and optionally baked models.
# Variables: variables.pkr.hcl; values: defaults.pkrvars.hcl; how and why: docs/packaging.md.
#
#   packer init .            (or install the amazon plugin by hand: ci/install-packaging-tools.sh)
#   packer build -var-file=defaults.pkrvars.hcl -var agent_wheel=../dist/<wheel> -var webui_bundle=../dist/webui-<webui>.tar.gz .
#
# Every build ends cleanup -> validate -> version inventory (sdagent-<webui>-version-info.json).

packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.8.0"
    }
  }
}

locals {
  timestamp      = formatdate("YYYYMMDDhhmmss", timestamp())
  ami_name       = "${var.ami_name_prefix}-${var.webui}-${local.timestamp}"
  webui_revision = var.webui_revision[var.webui]
  # Files reach the build instance here first, then provisioners/install-*.sh put them in place.
  staging = "/tmp/sdagent-build"
}

source "amazon-ebs" "gpu" {
  region        = var.aws_region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id == "" ? null : var.subnet_id
  # packer makes a temporary group open to its own address when none is given.
  security_group_id    = var.security_group_id == "" ? null : var.security_group_id
  iam_instance_profile = var.iam_instance_profile == "" ? null : var.iam_instance_profile
  ssh_username         = var.ssh_username
  ssh_pty              = true

  source_ami_filter {
    filters = {
      name                = var.source_ami_name_filter
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
      state               = "available"
    }
    owners      = [var.source_ami_owner]
    most_recent = true
  }

  # The build instance gets the fleet's instance metadata rules: IMDSv2 only, one hop.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = var.root_volume_size_gb
    volume_type           = var.root_volume_type
    delete_on_termination = true
  }

  ami_name        = local.ami_name
  ami_description = "sdagent ${var.webui} at ${local.webui_revision} on {{ .SourceAMIName }}"
  ami_regions     = var.ami_regions
  ami_users       = var.ami_users
  snapshot_users  = var.ami_users
  encrypt_boot    = var.encrypt_boot
  kms_key_id      = var.kms_key_id == "" ? null : var.kms_key_id
  # ENA and SR-IOV are on in the base AMI already; said again so that a base without them fails.
  ena_support   = true
  sriov_support = true

  tags = {
    Name            = local.ami_name
    sdagent_webui   = var.webui
    webui_revision  = local.webui_revision
    source_ami_id   = "{{ .SourceAMI }}"
    source_ami_name = "{{ .SourceAMIName }}"
    build_region    = "{{ .BuildRegion }}"
  }
  run_tags = {
    Name = "packer ${local.ami_name}"
  }
}

build {
  sources = ["source.amazon-ebs.gpu"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}/rootfs ${local.staging}/dist ${local.staging}/docs ${local.staging}/webui/locks"]
  }

  # The files the image carries, each uploaded once from where it lives in this repository.
  provisioner "file" {
    source      = "${path.root}/../systemd/rootfs/"
    destination = "${local.staging}/rootfs"
  }
  provisioner "file" {
    source      = var.agent_wheel
    destination = "${local.staging}/dist/"
  }
  provisioner "file" {
    source      = var.cloudwatch_agent_config
    destination = "${local.staging}/cloudwatch-agent.json"
  }
  provisioner "file" {
    sources     = [var.webui_bundle, "${var.webui_bundle}.sha256", "${path.root}/provisioners/clip-l-offline.py"]
    destination = "${local.staging}/webui/"
  }
  provisioner "file" {
    source      = "${path.root}/locks/${var.webui}.txt"
    destination = "${local.staging}/webui/locks/${var.webui}.txt"
  }
  provisioner "file" {
    sources     = ["${path.root}/../docs/packaging.md", "${path.root}/../docs/boot-budget.md"]
    destination = "${local.staging}/docs/"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/install-base.sh"
    environment_vars = [
      "UV_VERSION=${var.uv_version}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/install-agent.sh"
    environment_vars = [
      "STAGING=${local.staging}",
      "AGENT_PYTHON=${var.agent_python}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/install-webui.sh"
    environment_vars = [
      "STAGING=${local.staging}",
      "WEBUI=${var.webui}",
      "WEBUI_PYTHON=${var.webui_python[var.webui]}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/install-cloudwatch-agent.sh"
    environment_vars = [
      "STAGING=${local.staging}",
      "CLOUDWATCH_AGENT_URL=${var.cloudwatch_agent_url}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/install-units.sh"
    environment_vars = [
      "STAGING=${local.staging}",
      "WEBUI=${var.webui}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/install-models.sh"
    environment_vars = [
      "MODELS_S3_URI=${var.models_s3_uri}",
      "AWS_REGION=${var.aws_region}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/cleanup.sh"
    environment_vars = [
      "STAGING=${local.staging}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/validate.sh"
    environment_vars = [
      "WEBUI=${var.webui}",
    ]
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/provisioners/generate-version-info.sh"
    environment_vars = [
      "WEBUI=${var.webui}",
      "WEBUI_REVISION=${local.webui_revision}",
      "OUTPUT=/tmp/version-info.json",
    ]
  }

  provisioner "file" {
    direction   = "download"
    source      = "/tmp/version-info.json"
    destination = "${local.ami_name}-version-info.json"
  }

  provisioner "shell" {
    inline = ["sudo rm -f /tmp/version-info.json"]
  }

  post-processor "manifest" {
    output     = "manifest.json"
    strip_path = true
    custom_data = {
      webui          = var.webui
      webui_revision = local.webui_revision
      source_ami_id  = "${build.SourceAMI}"
    }
  }
}
