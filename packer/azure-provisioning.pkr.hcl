# An agentless Debian 12 managed image built with Packer's azure-arm builder:
# the image's agents are purged, azure-provisioning is installed, and the last
# step deprovisions the build VM and proves the image ready with --check.
# README.md ("Building the image with Packer") explains each step;
# tests/test_packer.py validates this file.
#
#   az login
#   packer init packer/azure-provisioning.pkr.hcl       # Packer 1.7+: the azure plugin
#   packer build -var resource_group=images packer/azure-provisioning.pkr.hcl

packer {
  required_plugins {
    azure = {
      source  = "github.com/hashicorp/azure"
      version = "~> 2"
    }
  }
}

variable "resource_group" {
  type        = string
  description = "An existing resource group; the managed image is created in it."
}

variable "image_name" {
  type    = string
  default = "debian-12-agentless"
}

variable "location" {
  type    = string
  default = "eastus"
}

variable "repo" {
  type        = string
  default     = ""
  description = "This repository's checkout, where the three files are uploaded from (default: the directory above this file)."
}

locals {
  repo       = var.repo != "" ? var.repo : "${path.root}/.."
  build_user = "packer"
  # sh -e: stop at the first failing command (`sh FILE` ignores the inline_shebang)
  as_root = "{{ .Vars }} sudo -E sh -ex '{{ .Path }}'"
}

source "azure-arm" "debian" {
  use_azure_cli_auth = true # after `az login`; or client_id, client_secret, tenant_id, subscription_id

  os_type         = "Linux"
  image_publisher = "Debian"
  image_offer     = "debian-12"
  image_sku       = "12-gen2"
  location        = var.location
  vm_size         = "Standard_B2s"
  ssh_username    = local.build_user

  managed_image_name                = var.image_name
  managed_image_resource_group_name = var.resource_group
}

build {
  sources = ["source.azure-arm.debian"]

  # 1. the image's agents go: at first boot they would race ours for the Ready report
  provisioner "shell" {
    execute_command  = local.as_root
    environment_vars = ["DEBIAN_FRONTEND=noninteractive"]
    inline = [
      "apt-get purge -y waagent cloud-init", # Ubuntu's agent package: walinuxagent
      "rm -rf /var/lib/waagent /etc/waagent.conf /var/log/waagent.log /var/lib/cloud",
    ]
  }

  # 2. this repository's files, side by side as install.sh expects them
  provisioner "file" {
    sources = [
      "${local.repo}/azure_provisioning.py",
      "${local.repo}/azure-provisioning.service",
      "${local.repo}/install.sh",
    ]
    destination = "/tmp/"
  }

  # 3. the script and its unit, enabled; each VM gets its admin user at first boot
  provisioner "shell" {
    execute_command = local.as_root
    inline = [
      "sh /tmp/install.sh --provision-user",
      "rm -f /tmp/install.sh /tmp/azure_provisioning.py /tmp/azure-provisioning.service",
    ]
  }

  # 4. last: generalize, then prove the image ready; nothing may run after this,
  # since it could write back what was removed.  --user removes only a user that
  # --provision-user made: the build VM's login user comes from the marketplace
  # image's agent, so it goes here by name (-f: its SSH session runs this script),
  # with that agent's sudo rule.  --check fails while /etc/machine-id is set, so it
  # comes after the deprovision; sh -e makes its failure fail the build.
  provisioner "shell" {
    execute_command = local.as_root
    skip_clean      = true # Packer's login user is gone: it could not delete this script
    inline = [
      "/usr/local/sbin/azure-provisioning --deprovision --user",
      "userdel -f -r ${local.build_user}",
      "rm -f /etc/sudoers.d/90-cloud-init-users /etc/sudoers.d/waagent",
      "/usr/local/sbin/azure-provisioning --check",
      "rm -f $0",
      "sync",
    ]
  }
}
