#!/bin/bash
# GitHub Actions runner in /opt/actions-runner, owned by the unprivileged
# `runner` user that every job runs as. The release is pinned and checked
# against its published SHA-256 before anything in it runs.
set -euo pipefail
: "${RUNNER_VERSION:?}" "${RUNNER_SHA256:?}"

RUNNER_DIR=/opt/actions-runner
RUNNER_USER=runner

# No sudo for the runner: jobs get what the image has. A job that needs a
# system package means a change here and a new AMI.
id -u "$RUNNER_USER" >/dev/null 2>&1 || useradd --create-home --user-group --shell /bin/bash "$RUNNER_USER"

tarball=$(mktemp --suffix=.tar.gz)
curl -fsSL --retry 5 --retry-connrefused -o "$tarball" \
  "https://github.com/actions/runner/releases/download/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz"
echo "${RUNNER_SHA256}  ${tarball}" | sha256sum --check --strict -

install -d -m 0755 "$RUNNER_DIR"
tar -xzf "$tarball" -C "$RUNNER_DIR"
rm -f "$tarball"

# The .NET runtime's native dependencies (ICU, Kerberos, LTTng, ...).
"$RUNNER_DIR/bin/installdependencies.sh"

# What config.sh's env.sh would record; a JIT runner never runs config.sh.
home=$(getent passwd "$RUNNER_USER" | cut -d: -f6)
echo "$home/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" >"$RUNNER_DIR/.path"
echo "LANG=C.UTF-8" >"$RUNNER_DIR/.env"

# run.sh rewrites run-helper.sh and the runner writes _diag and _work here.
chown -R "$RUNNER_USER:$RUNNER_USER" "$RUNNER_DIR"
runuser -u "$RUNNER_USER" -- "$RUNNER_DIR/bin/Runner.Listener" --version
