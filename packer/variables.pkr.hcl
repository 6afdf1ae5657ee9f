# Every variable the sdagent AMI build takes, in one place. Values come from defaults.pkrvars.hcl;
# override one with -var name=value or a second -var-file (docs/packaging.md).

# --- where and how the build instance runs -----------------------------------------------------

variable "aws_region" {
  type        = string
  description = "Region the AMI is built in."
}

variable "ami_regions" {
  type        = list(string)
  description = "Further regions the finished AMI is copied to (empty: the build region only)."
}

variable "ami_users" {
  type        = list(string)
  description = "AWS account ids allowed to launch the AMI (empty: this account only)."
}

variable "ami_name_prefix" {
  type        = string
  description = "AMI name prefix; the build appends the backend and a UTC timestamp."
}

variable "instance_type" {
  type        = string
  description = "Build instance type. A GPU type, so that validate.sh can run nvidia-smi and a CUDA check."
}

variable "subnet_id" {
  type        = string
  description = "Subnet of the build instance (empty: the default VPC)."
}

variable "security_group_id" {
  type        = string
  description = "Security group of the build instance (empty: packer makes a temporary one)."
}

variable "ssh_username" {
  type        = string
  description = "Login user of the base AMI (ubuntu on the Deep Learning Base AMIs)."
}

# --- base image --------------------------------------------------------------------------------

variable "source_ami_name_filter" {
  type        = string
  description = "Name filter of the base AMI; the newest match is used (docs/packaging.md, 'Base AMI')."
}

variable "source_ami_owner" {
  type        = string
  description = "Owner alias or account id of the base AMI."
}

# --- root volume -------------------------------------------------------------------------------

variable "root_volume_size_gb" {
  type        = number
  description = "Root EBS volume size: base image (~60 GB), WebUI and its Python deps, baked models."
}

variable "root_volume_type" {
  type        = string
  description = "Root EBS volume type."
}

variable "encrypt_boot" {
  type        = bool
  description = "Encrypt the AMI's snapshot."
}

variable "kms_key_id" {
  type        = string
  description = "KMS key for the snapshot when encrypt_boot is true (empty: the account's EBS default key)."
}

# --- what goes in ------------------------------------------------------------------------------

variable "agent_wheel" {
  type        = string
  description = "Path of the sdagent wheel to install (python -m build --wheel, in dist/)."
}

variable "agent_python" {
  type        = string
  description = "Python version of the agent's virtualenv /opt/sdagent (sdagent needs 3.11+)."
}

variable "uv_version" {
  type        = string
  description = "uv release (from PyPI) that makes the virtualenvs and provides pinned CPython builds."
}

variable "webui" {
  type        = string
  description = "The WebUI baked into the image: a1111 or comfyui."
  validation {
    condition     = contains(["a1111", "comfyui"], var.webui)
    error_message = "The webui variable must be \"a1111\" or \"comfyui\"."
  }
}

variable "webui_bundle" {
  type        = string
  description = "The WebUI's source tree as packer/make-webui-bundle.sh packs it (a .sha256 beside it); the build clones nothing."
}

variable "webui_revision" {
  type        = map(string)
  description = "Pinned commit of each WebUI (full 40-hex SHA; a tag or branch would drift)."
  validation {
    condition     = length([for revision in values(var.webui_revision) : revision if !can(regex("^[0-9a-f]{40}$", revision))]) == 0
    error_message = "Each webui_revision must be a full 40-hex commit SHA."
  }
}

variable "webui_python" {
  type        = map(string)
  description = "Python version of each WebUI's virtualenv."
}

variable "cloudwatch_agent_url" {
  type        = string
  description = "amazon-cloudwatch-agent .deb for the base AMI's distribution and architecture."
}

variable "cloudwatch_agent_config" {
  type        = string
  description = "CloudWatch agent configuration (cloudwatch/agent.json in this repository)."
}

variable "models_s3_uri" {
  type        = string
  description = "Optional s3://bucket/prefix/ of model files to bake into /opt/sdagent/models (empty: none)."
}

variable "iam_instance_profile" {
  type        = string
  description = "Instance profile of the build instance; needs s3:GetObject on models_s3_uri when set (empty: none)."
}
