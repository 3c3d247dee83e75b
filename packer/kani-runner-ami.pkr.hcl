# AMI for spot-runners instances: Ubuntu 24.04 with the GitHub Actions runner,
# Rust and Kani baked in, so an instance boots straight into a ready runner and
# downloads nothing on the normal path (user-data/kani-runner-userdata.sh only
# fetches the runner when an image lacks it).
#
#   packer init packer/kani-runner-ami.pkr.hcl
#   packer build -var region=eu-west-1 packer/kani-runner-ami.pkr.hcl
#
# Put the resulting AMI id in instance_profiles.image_id, or let profiles find
# the newest build by name: image_filter = 'self/kani-runner-*' (docs/operations.md).

packer {
  required_version = ">= 1.9.0"
  required_plugins {
    amazon = {
      # Any 1.x from 1.3 on: a 2.0 may change the builder's settings, so it
      # is taken on purpose (edit here), never by a plain `packer init`.
      version = "~> 1.3"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type        = string
  description = "Region to build in; the AMI is usable only there unless copied."
  default     = "us-east-1"
}

variable "instance_type" {
  type        = string
  description = "Build instance; only the build runs on it, not the jobs."
  default     = "c6i.2xlarge"
}

variable "subnet_id" {
  type        = string
  description = "Subnet for the build instance; empty uses the default VPC. Needs outbound internet."
  default     = ""
}

variable "root_volume_gb" {
  type        = number
  description = "Size of the AMI's root volume. Profiles may launch with a bigger root_volume_gb, never a smaller one."
  default     = 30
}

# Keep runner_version/runner_sha256 in step with the constants in
# user-data/kani-runner-userdata.sh; scripts/check-assets compares them.
variable "runner_version" {
  type        = string
  description = "GitHub Actions runner release, without the leading v."
  default     = "2.334.0"
}

variable "runner_sha256" {
  type        = string
  description = "SHA-256 of actions-runner-linux-x64-<runner_version>.tar.gz as published with the release."
  default     = "048024cd2c848eb6f14d5646d56c13a4def2ae7ee3ad12122bee960c56f3d271"

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.runner_sha256))
    error_message = "The runner_sha256 value must be a lower-case hex SHA-256 digest."
  }
}

# A pinned release, not `stable`: proof and benchmark results must not drift
# between two AMI builds because a new Rust came out in between.
variable "rust_toolchain" {
  type        = string
  description = "Rust release installed as the runner user's default toolchain (rustup), e.g. 1.95.0."
  default     = "1.95.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.rust_toolchain))
    error_message = "The rust_toolchain value must be a release number such as 1.95.0, not a channel."
  }
}

variable "kani_version" {
  type        = string
  description = "kani-verifier crate version; empty installs the newest release."
  default     = "0.67.0"
}

variable "tags" {
  type        = map(string)
  description = "Tags for the AMI, its snapshot and the build instance."
  default = {
    Project = "spot-runners"
    Role    = "kani-runner"
  }
}

locals {
  build_stamp = formatdate("YYYYMMDD-hhmmss", timestamp())
}

source "amazon-ebs" "kani_runner" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id

  ami_name        = "kani-runner-${var.runner_version}-${local.build_stamp}"
  ami_description = "spot-runners: Ubuntu 24.04, GitHub Actions runner ${var.runner_version}, Rust, Kani"

  # Canonical's account; the filter picks the newest Noble image at build time.
  source_ami_filter {
    filters = {
      name                = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["099720109477"]
    most_recent = true
  }

  ssh_username = "ubuntu"

  # The build instance follows the same IMDS rules as the runners, and the
  # AMI is marked IMDSv2-only so nothing launched from it falls back to v1.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"
  ena_support  = true

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = var.root_volume_gb
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }

  run_tags      = var.tags
  snapshot_tags = var.tags
  tags = merge(var.tags, {
    Name              = "kani-runner-${var.runner_version}-${local.build_stamp}"
    "runner-version"  = var.runner_version
    "kani-version"    = var.kani_version
    "rust-toolchain"  = var.rust_toolchain
    "source-ami"      = "{{ .SourceAMI }}"
    "source-ami-name" = "{{ .SourceAMIName }}"
  })
}

build {
  name    = "kani-runner"
  sources = ["source.amazon-ebs.kani_runner"]

  # With a trailing slash on its source the file provisioner uploads the
  # directory's contents into the destination, which must already exist:
  # without this step the files land on one path and 40-benchmark-tuning.sh
  # fails far into the build.
  provisioner "shell" {
    inline = ["install -d -m 0755 /tmp/spot-runners-files"]
  }

  provisioner "file" {
    source      = "${path.root}/files/"
    destination = "/tmp/spot-runners-files"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "DEBIAN_FRONTEND=noninteractive",
      "RUNNER_VERSION=${var.runner_version}",
      "RUNNER_SHA256=${var.runner_sha256}",
      "RUST_TOOLCHAIN=${var.rust_toolchain}",
      "KANI_VERSION=${var.kani_version}",
      "FILES_DIR=/tmp/spot-runners-files",
    ]
    scripts = [
      "${path.root}/scripts/10-base.sh",
      "${path.root}/scripts/20-actions-runner.sh",
      "${path.root}/scripts/30-rust-kani.sh",
      "${path.root}/scripts/40-benchmark-tuning.sh",
      "${path.root}/scripts/90-cleanup.sh",
    ]
  }

  post-processor "manifest" {
    output     = "${path.root}/packer-manifest.json"
    strip_path = true
  }
}
