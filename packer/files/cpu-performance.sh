#!/bin/bash
# Pins the CPU frequency governor to performance so benchmark results do not
# depend on how a governor ramped up. Most EC2 sizes give the guest no
# frequency control (the hypervisor owns P-states): then there is nothing to
# pin, and that is not an error.
set -euo pipefail
shopt -s nullglob

governors=(/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor)
if ((${#governors[@]} == 0)); then
  echo "no cpufreq control exposed to this instance; nothing to pin"
  exit 0
fi

# Ubuntu's cpupower is a wrapper that fails when the tools for the running
# kernel are missing; sysfs always works.
if command -v cpupower >/dev/null && cpupower frequency-set --governor performance >/dev/null 2>&1; then
  echo "governor pinned to performance with cpupower"
else
  for governor in "${governors[@]}"; do
    echo performance >"$governor"
  done
  echo "governor pinned to performance on ${#governors[@]} CPUs"
fi
