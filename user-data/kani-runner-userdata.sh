#!/bin/bash
# spot-runners boot script: the service fills in the quoted values below
# (plain text substitution) and sends the result as EC2 user data, so the file
# must stay valid shell both as a template and once rendered, and stay small
# (EC2 caps user data at 16 KB).
#
# User data carries no secret: any principal allowed ec2:DescribeInstanceAttribute
# can read it. The runner's JIT config waits in an SSM SecureString that the
# service granted to this instance alone (tag spot-runners:instance-arn); this
# script reads it once with the instance role, deletes it, and hands it to the
# runner on stdin, never on a command line (/proc/*/cmdline is world-readable).
# Jobs run as the runner user, which is firewalled off the metadata service, so
# no job step can take the instance role's credentials or read user data.
#
# One instance runs one job, then powers itself off, which terminates it
# (InstanceInitiatedShutdownBehavior=terminate). It also powers off when no job
# has started by the idle limit, at the maximum lifetime, and whenever this
# script fails: the service terminates instances itself, but an outage of the
# service must never leave an instance running up a bill.
set -euo pipefail

CONTROLLER_ID='@@CONTROLLER_ID@@'
PROFILE='@@PROFILE@@'
RUNNER_NAME='@@RUNNER_NAME@@'
# Seconds after boot by which a job must have started; seconds after boot at
# which the instance goes whatever it is doing.
IDLE_LIMIT_SECS='@@IDLE_LIMIT_SECS@@'
MAX_LIFETIME_SECS='@@MAX_LIFETIME_SECS@@'
# 1: the profile asks for benchmark tuning (benchmark_tuning); 0: defaults.
BENCHMARK_TUNING='@@BENCHMARK_TUNING@@'

# Used only when the AMI lacks the runner. Keep in step with the defaults in
# packer/kani-runner-ami.pkr.hcl (scripts/check-assets compares them).
RUNNER_VERSION='2.334.0'
RUNNER_SHA256='048024cd2c848eb6f14d5646d56c13a4def2ae7ee3ad12122bee960c56f3d271'

# Only the boot-script test (crates/server/tests/boot_script.rs) sets these,
# to run this script unprivileged against fake AWS and runner commands;
# cloud-init runs it with neither set.
RUNNER_DIR=${SPOT_RUNNERS_TEST_RUNNER_DIR:-/opt/actions-runner}
LOG_FILE=${SPOT_RUNNERS_TEST_LOG_FILE:-/var/log/spot-runners-userdata.log}
TUNING_SCRIPT=${SPOT_RUNNERS_TEST_TUNING_SCRIPT:-/usr/local/sbin/spot-runners-benchmark-tuning}
# What tuning this instance got, key=value lines, for a job to print.
TUNING_FILE=${SPOT_RUNNERS_TEST_TUNING_FILE:-/run/spot-runners/tuning}
RUNNER_USER=runner
IMDS_IP=169.254.169.254
IMDS=http://$IMDS_IP/latest
JIT_PARAMETER="/spot-runners/$CONTROLLER_ID/jit/$RUNNER_NAME"
# The service grants the parameter to this instance right after RunInstances
# answers (or, after a crash, when it adopts the instance): until then reads
# are refused, so they are retried this many times, 5 s apart.
JIT_FETCH_ATTEMPTS=36

# The journal for a live instance, the serial console for one that is gone or
# unreachable (aws ec2 get-console-output), a file for a quick look.
console=/dev/console
[[ -w $console ]] || console=/dev/null
exec > >(tee -a "$LOG_FILE" | logger -t spot-runners -s 2>"$console") 2>&1

log() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

powering_off=''
power_off() {
  [[ -z $powering_off ]] || return 0
  powering_off=1
  log "powering off: $*"
  shutdown -h now || poweroff --force
}

die() {
  log "FATAL: $*"
  exit 1
}

trap 'power_off "boot script ended (status $?)"' EXIT

# A value that fails these checks means the service did not render the
# template; running on would only burn money until a watchdog fired.
[[ $RUNNER_NAME =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "no runner name in the user data"
[[ $IDLE_LIMIT_SECS =~ ^[1-9][0-9]*$ ]] || die "idle limit is not a number of seconds"
[[ $MAX_LIFETIME_SECS =~ ^[1-9][0-9]*$ ]] || die "lifetime is not a number of seconds"
[[ $BENCHMARK_TUNING =~ ^[01]$ ]] || die "benchmark tuning flag is not 0 or 1"

imds_token() {
  curl -fsS --max-time 5 --retry 3 --retry-connrefused -X PUT \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$IMDS/api/token"
}

imds_get() {
  curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $1" "$IMDS/meta-data/$2" || echo '?'
}

# Jobs run as the runner user. Without this, any job step could ask the
# metadata service for the instance role's credentials and for user data.
# Fails closed: an instance that cannot block it runs no job.
block_metadata_for_runner() {
  iptables -w -I OUTPUT -d "$IMDS_IP/32" -m owner --uid-owner "$RUNNER_USER" -j REJECT ||
    die "cannot firewall the metadata service off the $RUNNER_USER user; refusing to run jobs"
  # IPv6 IMDS is off for our launches; block it too where the kernel has IPv6.
  if command -v ip6tables >/dev/null; then
    ip6tables -w -I OUTPUT -d fd00:ec2::254/128 -m owner --uid-owner "$RUNNER_USER" -j REJECT ||
      log "ip6tables refused the IPv6 metadata rule (IPv6 IMDS is disabled at launch)"
  fi
  if runuser -u "$RUNNER_USER" -- curl -sS --max-time 3 -o /dev/null -X PUT \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$IMDS/api/token" 2>/dev/null; then
    die "the $RUNNER_USER user still reaches the metadata service; refusing to run jobs"
  fi
  log "metadata service blocked for $RUNNER_USER"
}

# One SSM call (JSON protocol), signed by curl with the instance role's
# credentials. The keys reach curl on stdin (-K -), never on its command line.
ssm_call() {
  local action=$1 body=$2 host="ssm.$region.amazonaws.com"
  [[ $region != cn-* ]] || host+=.cn
  jq -r '"user = \"\(.AccessKeyId):\(.SecretAccessKey)\"", "header = \"X-Amz-Security-Token: \(.Token)\""' \
    <<<"$role_credentials" |
    curl -fsS --max-time 10 -K - --aws-sigv4 "aws:amz:$region:ssm" \
      -H "X-Amz-Target: AmazonSSM.$action" -H 'Content-Type: application/x-amz-json-1.1' \
      --data-binary "$body" "https://$host/"
}

# Reads this runner's JIT config into $jit_config once, then deletes the
# parameter: a config nobody can fetch twice is of no use to anyone later.
fetch_jit_config() {
  local role attempt reply=''
  region=$(curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" "$IMDS/meta-data/placement/region") ||
    die "no region from the metadata service"
  role=$(curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" "$IMDS/meta-data/iam/security-credentials/") ||
    die "no instance role: the runner reads its JIT config with one (docs/operations.md, iam_instance_profile)"
  role_credentials=$(curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" \
    "$IMDS/meta-data/iam/security-credentials/${role%%$'\n'*}") || die "no credentials for the instance role"
  for ((attempt = 1; attempt <= JIT_FETCH_ATTEMPTS; attempt++)); do
    reply=$(ssm_call GetParameter "{\"Name\":\"$JIT_PARAMETER\",\"WithDecryption\":true}") && break
    reply=''
    sleep 5
  done
  [[ -n $reply ]] || die "could not read $JIT_PARAMETER (not granted to this instance, or already read)"
  jit_config=$(jq -r '.Parameter.Value // empty' <<<"$reply")
  reply=''
  ssm_call DeleteParameter "{\"Name\":\"$JIT_PARAMETER\"}" >/dev/null ||
    log "could not delete $JIT_PARAMETER; the service deletes it once the runner is online"
  role_credentials=''
  [[ $jit_config =~ ^[A-Za-z0-9+/=]+$ ]] || die "$JIT_PARAMETER holds no JIT config"
  log "JIT config read from $JIT_PARAMETER and deleted"
}

uptime_secs() {
  local up _
  read -r up _ </proc/uptime
  echo "${up%.*}"
}

# A Worker log appears, and a Runner.Worker process runs, only once the
# runner has been given a job.
job_started() {
  compgen -G "$RUNNER_DIR/_diag/Worker_*.log" >/dev/null || pgrep -x Runner.Worker >/dev/null
}

watchdog() {
  local up started=''
  while sleep 10; do
    up=$(uptime_secs)
    if ((up >= MAX_LIFETIME_SECS)); then
      power_off "maximum lifetime of ${MAX_LIFETIME_SECS}s reached"
      return
    fi
    [[ -z $started ]] || continue
    if job_started; then
      started=1
      log "job started ${up}s after boot"
    elif ((up >= IDLE_LIMIT_SECS)); then
      power_off "no job started within ${IDLE_LIMIT_SECS}s of boot"
      return
    fi
  done
}

# ---- spot interruption and rebalance (IMDSv2) --------------------------
# On the interruption notice (2 min ahead) the runner is stopped as run.sh
# stops it (SIGINT): GitHub fails the job at once ("received a shutdown
# signal") instead of losing the runner minutes later. An idle runner quits
# on a rebalance recommendation, so the service replaces it before the
# reclaim. Each event leaves a "spot-runners-event" line on the serial
# console, which outlives the instance (ec2:GetConsoleOutput).
INTERRUPTION_POLL_SECS=5
event_line() { log "spot-runners-event $1 runner=$RUNNER_NAME ${*:2}"; }
# imds_path TOKEN PATH: the HTTP status, a newline, the body.
imds_path() {
  curl -sS --max-time 3 -w '\n%{http_code}' -H "X-aws-ec2-metadata-token: $1" "$IMDS/meta-data/$2" 2>/dev/null
}
stop_runner() {
  log "stopping the runner: $1"
  pkill -INT -u "$RUNNER_USER" -x Runner.Listener || log "no Runner.Listener to stop"
}
interruption_watch() {
  local token='' token_at=-100000 reply rebalanced=''
  while sleep "$INTERRUPTION_POLL_SECS"; do
    # Tokens live 6 h and an instance may live longer: renew every hour.
    if ((SECONDS - token_at > 3600)); then
      token=$(imds_token 2>/dev/null) || continue
      token_at=$SECONDS
    fi
    reply=$(imds_path "$token" spot/instance-action) || continue
    case ${reply##*$'\n'} in
      200)
        local state=idle
        job_started && state=busy
        event_line interruption-notice "job=$state notice=${reply%$'\n'*}"
        stop_runner "spot interruption notice"
        return
        ;;
      401)
        token_at=-100000
        continue
        ;;
    esac
    [[ -z $rebalanced ]] || continue
    reply=$(imds_path "$token" events/recommendations/rebalance) || continue
    [[ ${reply##*$'\n'} == 200 ]] || continue
    rebalanced=1
    if job_started; then
      event_line rebalance-recommendation "job=busy action=none notice=${reply%$'\n'*}"
    else
      event_line rebalance-recommendation "job=idle action=replace notice=${reply%$'\n'*}"
      stop_runner "rebalance recommendation while idle"
      power_off "rebalance recommendation while idle: the service launches a replacement"
      return
    fi
  done
}
# ---- end of spot interruption and rebalance -------------------------------

# The image's benchmark tuning, only where the profile asks for it. An image
# without the tuning script still runs the job, and the state file says so.
apply_tuning() {
  mkdir -p "${TUNING_FILE%/*}"
  if [[ $BENCHMARK_TUNING != 1 ]]; then
    echo benchmark_tuning=off >"$TUNING_FILE"
  elif [[ -x $TUNING_SCRIPT ]]; then
    "$TUNING_SCRIPT" "$TUNING_FILE" || log "benchmark tuning ended with status $?"
  else
    echo "benchmark_tuning=unavailable (the image has no $TUNING_SCRIPT)" >"$TUNING_FILE"
  fi
  [[ -s $TUNING_FILE ]] || echo 'benchmark_tuning=failed (no state written)' >"$TUNING_FILE"
  chmod 0644 "$TUNING_FILE"
  log "tuning ($TUNING_FILE): $(paste -sd ' ' "$TUNING_FILE")"
}

# Slow path for an AMI without the runner: a pinned release, checked against
# its published digest before anything in it runs.
install_runner() {
  log "runner missing from the image: installing $RUNNER_VERSION (slow path)"
  [[ $RUNNER_SHA256 =~ ^[0-9a-f]{64}$ ]] || die "RUNNER_SHA256 is not a digest; refusing an unverified runner"
  id -u "$RUNNER_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$RUNNER_USER"
  local tgz=/tmp/actions-runner.tar.gz
  curl -fsSL --retry 5 --retry-connrefused -o "$tgz" \
    "https://github.com/actions/runner/releases/download/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz"
  echo "$RUNNER_SHA256  $tgz" | sha256sum --check --quiet - || die "runner tarball does not match RUNNER_SHA256"
  mkdir -p "$RUNNER_DIR"
  tar -xzf "$tgz" -C "$RUNNER_DIR"
  rm -f "$tgz"
  "$RUNNER_DIR/bin/installdependencies.sh" || log "installdependencies.sh failed; trying the runner anyway"
  chown -R "$RUNNER_USER:" "$RUNNER_DIR"
}

token=$(imds_token) || token=''
log "runner $RUNNER_NAME, profile $PROFILE, controller $CONTROLLER_ID," \
  "instance $(imds_get "$token" instance-id) ($(imds_get "$token" instance-type)," \
  "$(imds_get "$token" placement/availability-zone)); job within ${IDLE_LIMIT_SECS}s," \
  "lifetime ${MAX_LIFETIME_SECS}s"

[[ -x $RUNNER_DIR/run.sh ]] || install_runner
block_metadata_for_runner
apply_tuning

watchdog &
interruption_watch &

fetch_jit_config

home=$(getent passwd "$RUNNER_USER" | cut -d: -f6)
cd "$RUNNER_DIR"
status=0
# A clean environment: nothing from cloud-init or root leaks into jobs. The
# JIT config goes in on stdin and on into the runner's environment
# (ACTIONS_RUNNER_INPUT_JITCONFIG, which the runner reads and drops from the
# environment its jobs inherit).
# shellcheck disable=SC2016 # expanded by the runner user's shell
runuser -u "$RUNNER_USER" -- env -i \
  HOME="$home" USER="$RUNNER_USER" LOGNAME="$RUNNER_USER" SHELL=/bin/bash LANG=C.UTF-8 \
  PATH="$home/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  bash -c 'IFS= read -r ACTIONS_RUNNER_INPUT_JITCONFIG && export ACTIONS_RUNNER_INPUT_JITCONFIG && exec ./run.sh </dev/null' \
  <<<"$jit_config" || status=$?
jit_config=''
log "runner exited with status $status"
