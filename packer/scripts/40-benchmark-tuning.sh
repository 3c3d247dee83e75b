#!/bin/bash
# What benchmarks need, installed but not applied: the tuning script that the
# boot script runs only on instances of profiles with benchmark_tuning (Kani
# runners keep the kernel's defaults), and perf for the kernel instances boot.
set -euo pipefail
: "${FILES_DIR:?}"

install -m 0755 "$FILES_DIR/benchmark-tuning.sh" /usr/local/sbin/spot-runners-benchmark-tuning

# Ubuntu's perf is a wrapper that runs the perf built for the running
# kernel. The build instance still runs the kernel it booted with, while
# 10-base.sh's upgrades may have installed a newer one, which is what every
# instance boots: perf must exist for that one. (The tuning script records
# in its state file whether perf matches the kernel an instance runs.)
boot_kernel=$(linux-version list | linux-version sort | tail -n 1)
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "linux-tools-$boot_kernel"
"/usr/lib/linux-tools/$boot_kernel/perf" --version
echo "perf installed for the kernel instances boot: $boot_kernel"
