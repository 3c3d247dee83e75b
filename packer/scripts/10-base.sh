#!/bin/bash
# Base system for the runner AMI: patched at build time, then quiet at run time.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# The build instance's own first boot may still hold the apt lock: cloud-init,
# and apt's boot-time timers. Stop the timers and wait for a running one to
# finish (a unit ordered after them starts only once they are done).
cloud-init status --wait >/dev/null || true
systemctl stop apt-daily.timer apt-daily-upgrade.timer
systemd-run --wait --quiet --property=After=apt-daily.service \
  --property=After=apt-daily-upgrade.service /bin/true || true
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }

apt_get update
apt_get install -y --no-install-recommends unattended-upgrades
# Security updates go in now, at build time, with the stock Ubuntu policy
# (the -security pocket only). Instances live for one job: patching them at
# boot would only delay the job and, for benchmarks, add noise. Fresh patches
# come from rebuilding the AMI (docs/operations.md).
unattended-upgrade --verbose

apt_get install -y --no-install-recommends \
  build-essential pkg-config libssl-dev \
  git git-lfs curl ca-certificates gnupg jq unzip zip xz-utils zstd \
  python3 python3-venv \
  linux-tools-common linux-tools-aws \
  time

# The boot script firewalls the metadata service off the runner user
# (iptables) and reads its JIT config from SSM (curl >= 7.75 signs with
# --aws-sigv4, jq reads the answer).
apt_get install -y --no-install-recommends iptables

# No background package activity on runners: apt's timers and snap refreshes
# would compete with the job for CPU, disk and the dpkg lock. Masked, not
# disabled: the image ships an empty machine-id, so every instance's first
# boot re-applies systemd presets, which would enable them again.
systemctl mask apt-daily.timer apt-daily-upgrade.timer unattended-upgrades.service
if command -v snap >/dev/null; then
  snap refresh --hold || true
  # The runners' role lets an instance read and delete its own JIT config,
  # nothing else (deploy/iam/), so the agent could only retry in the background.
  snap stop --disable amazon-ssm-agent 2>/dev/null || true
fi

# Keys only. sshd keeps the first value it reads and reads sshd_config.d in
# lexical order, so this file wins over the cloud image's own.
cat >/etc/ssh/sshd_config.d/00-spot-runners.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
CONF
sshd -t
