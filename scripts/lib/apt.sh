# shellcheck shell=bash
# Asking apt whether it offers a package, safely under `set -o pipefail`.
#
# Piping `apt-cache policy PKG` into a quiet grep is wrong there: the grep
# exits at the first match, apt-cache dies of SIGPIPE on its next write, and
# the pipeline reports 141 — "not offered" for every package whose policy output is longer
# than what grep had read. The output is captured whole first instead.

# apt_offers PKG: true when the configured apt sources (or the installed
# package database) have an installable candidate version of PKG.
apt_offers() {
  local policy
  policy=$(apt-cache policy "$1" 2>/dev/null) || return 1
  [[ $policy =~ Candidate:\ [0-9] ]]
}
