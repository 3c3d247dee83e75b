#!/bin/bash
# What benchmarks need: perf usable by the runner user, and the CPU frequency
# governor pinned (where the instance type lets the guest choose one).
set -euo pipefail
: "${FILES_DIR:?}"

install -m 0755 "$FILES_DIR/cpu-performance.sh" /usr/local/sbin/spot-runners-cpu-performance
install -m 0644 "$FILES_DIR/spot-runners-cpu-performance.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable spot-runners-cpu-performance.service

# Ubuntu's default (4) denies perf to unprivileged users, and jobs never run
# as root. 1 allows profiling one's own processes, kernel included; the
# instance is single-use and single-tenant, so exposing kernel addresses to
# the job is an accepted cost of usable kernel symbols in profiles.
cat >/etc/sysctl.d/60-spot-runners-perf.conf <<'CONF'
kernel.perf_event_paranoid = 1
kernel.kptr_restrict = 0
CONF

# Ubuntu's perf is a wrapper that runs the perf built for the running
# kernel. The build instance still runs the kernel it booted with, while
# 10-base.sh's upgrades may have installed a newer one, which is what every
# instance boots: perf must exist for that one.
boot_kernel=$(linux-version list | linux-version sort | tail -n 1)
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "linux-tools-$boot_kernel"
"/usr/lib/linux-tools/$boot_kernel/perf" --version
echo "perf installed for the kernel instances boot: $boot_kernel"
