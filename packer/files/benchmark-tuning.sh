#!/bin/bash
# Benchmark tuning, applied at boot by the boot script on instances of
# profiles with benchmark_tuning = true only (Kani runners keep the kernel's
# defaults): numbers from `cargo bench` runs of hours must be comparable run
# to run, so nothing that varies with load or history may steer the CPU.
#
#   spot-runners-benchmark-tuning STATE_FILE
#
# Writes what it applied, one key=value a line, to STATE_FILE
# (/run/spot-runners/tuning on an instance), where a job can print it.
# "unavailable" means the instance gives the guest no such control: most
# EC2 sizes leave P-states and C-states to the hypervisor, and that is not
# an error. A value it could not set is recorded as "failed".
set -uo pipefail

state_file=${1:?usage: $0 STATE_FILE}
# Only the boot-script test sets this, to run against a fake /sys and /proc.
root=${SPOT_RUNNERS_TEST_ROOT:-}
cpu=$root/sys/devices/system/cpu
thp=$root/sys/kernel/mm/transparent_hugepage
kernel=$root/proc/sys/kernel
state=()

# tune KEY VALUE FILE...: writes VALUE into each FILE that exists.
tune() {
  local key=$1 value=$2 file found=0 failed=0
  shift 2
  for file in "$@"; do
    [[ -e $file ]] || continue
    found=$((found + 1))
    { printf '%s\n' "$value" >"$file"; } 2>/dev/null || failed=$((failed + 1))
  done
  if ((found == 0)); then
    state+=("$key=unavailable")
  elif ((failed > 0)); then
    state+=("$key=failed ($failed of $found)")
  else
    state+=("$key=$value")
  fi
}

shopt -s nullglob
state+=("benchmark_tuning=on")
# Frequency: no governor ramping up under load, no turbo that depends on how
# hot the package is (intel_pstate and acpi-cpufreq name it differently).
tune governor performance "$cpu"/cpu[0-9]*/cpufreq/scaling_governor
tune intel_pstate_no_turbo 1 "$cpu/intel_pstate/no_turbo"
tune cpufreq_boost 0 "$cpu/cpufreq/boost"
# Idle states past C1: waking from them costs microseconds, unevenly.
tune deep_cstates_disabled 1 "$cpu"/cpu[0-9]*/cpuidle/state[2-9]/disable
# Huge pages that khugepaged assembles in the background at its own pace.
tune transparent_hugepage never "$thp/enabled"
tune transparent_hugepage_defrag never "$thp/defrag"
# The same addresses every run: cache and branch-predictor aliasing stops
# varying with where ASLR put things.
tune randomize_va_space 0 "$kernel/randomize_va_space"
# perf for the runner user (jobs never run as root). 1 allows profiling
# one's own processes, kernel included; the instance is single-use and
# single-tenant, so kernel addresses in profiles are an accepted cost.
tune perf_event_paranoid 1 "$kernel/perf_event_paranoid"
tune kptr_restrict 0 "$kernel/kptr_restrict"

# What the machine is, for the job's log: SMT follows the profile's
# threads_per_core (CpuOptions at launch), perf must match the kernel.
read -r smt 2>/dev/null <"$cpu/smt/active" || smt=unknown
read -r online 2>/dev/null <"$cpu/online" || online=unknown
state+=("smt_active=$smt" "online_cpus=$online" "kernel=$(uname -r)")
# Ubuntu's perf is a wrapper that fails unless linux-tools for the running
# kernel is installed (the AMI installs it for the kernel it boots).
if perf_version=$(perf --version 2>/dev/null); then
  state+=("perf=$perf_version")
else
  state+=("perf=missing for kernel $(uname -r)")
fi

mkdir -p "$(dirname "$state_file")"
printf '%s\n' "${state[@]}" >"$state_file.tmp" && chmod 0644 "$state_file.tmp" &&
  mv -f "$state_file.tmp" "$state_file"
