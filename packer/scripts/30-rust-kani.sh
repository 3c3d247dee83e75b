#!/bin/bash
# Rust (rustup, the pinned RUST_TOOLCHAIN release) and Kani for the runner
# user, installed where a job running as that user finds them: ~/.cargo,
# ~/.rustup and ~/.kani.
set -euo pipefail
: "${RUST_TOOLCHAIN:?}"
# A channel name (stable, beta, nightly) would make two builds differ.
[[ $RUST_TOOLCHAIN =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || {
  echo "RUST_TOOLCHAIN=$RUST_TOOLCHAIN is not a release number" >&2
  exit 1
}

RUNNER_USER=runner
home=$(getent passwd "$RUNNER_USER" | cut -d: -f6)

as_runner() {
  runuser -u "$RUNNER_USER" -- env -i HOME="$home" USER="$RUNNER_USER" LANG=C.UTF-8 \
    PATH="$home/.cargo/bin:/usr/local/bin:/usr/bin:/bin" "$@"
}

# rustup-init with the digest rust-lang.org publishes beside it: this catches
# a truncated or mangled download; authenticity rests on TLS to that host.
dir=$(mktemp -d)
base=https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu
curl -fsSL --retry 5 -o "$dir/rustup-init" "$base/rustup-init"
curl -fsSL --retry 5 -o "$dir/rustup-init.sha256" "$base/rustup-init.sha256"
echo "$(cut -d' ' -f1 "$dir/rustup-init.sha256")  $dir/rustup-init" | sha256sum --check --strict -
chmod 0755 "$dir/rustup-init"
chmod 0755 "$dir"
as_runner "$dir/rustup-init" -y --profile minimal --default-toolchain "$RUST_TOOLCHAIN" \
  --component clippy --component rustfmt
rm -rf "$dir"

version_args=()
if [[ -n ${KANI_VERSION:-} ]]; then
  version_args=(--version "$KANI_VERSION")
fi
as_runner cargo install --locked kani-verifier "${version_args[@]}"
# Downloads Kani's release bundle and the nightly toolchain it is built
# against, so no job pays for that at run time.
as_runner cargo kani setup
as_runner cargo kani --version
# The default must be the pin (a rust-toolchain file in a repository may
# still ask for another one; rustup then downloads it for that job).
as_runner rustc --version | grep -F "rustc $RUST_TOOLCHAIN " ||
  { echo "default toolchain is not $RUST_TOOLCHAIN" >&2; exit 1; }
