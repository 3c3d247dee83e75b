#!/bin/bash
# Leave nothing in the image that makes it bigger or that one instance should
# not inherit from the build instance.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get -y autoremove --purge
apt-get clean
rm -rf /var/lib/apt/lists/*

home=$(getent passwd runner | cut -d: -f6)
rm -rf "$home/.cargo/registry" "$home/.cargo/git" "$home/.rustup/downloads" "$home/.rustup/tmp"
rm -rf /opt/actions-runner/_diag /opt/actions-runner/_work
rm -rf "${FILES_DIR:-/tmp/spot-runners-files}" /tmp/* /var/tmp/*

# Every instance must get its own machine id and run cloud-init afresh.
cloud-init clean --logs
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id

journalctl --rotate || true
journalctl --vacuum-time=1s || true
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -f /root/.bash_history /home/ubuntu/.bash_history

# Snapshots store only written blocks; discarding freed ones keeps them small.
fstrim --all --verbose || true
