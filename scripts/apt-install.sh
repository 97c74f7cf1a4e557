#!/usr/bin/env bash
# Usage: scripts/apt-install.sh WHAT PACKAGE...  (as root; `make run` and `make test` call it)
# Installs Debian packages for cnnlab's set-up. Another apt or dpkg process holding the package lock (a fresh
# machine's unattended-upgrades, a second terminal) is waited for, up to $APT_LOCK_WAIT seconds (default 600),
# instead of failing at once. If the install still fails, one line beginning "cnnlab:" says what to run by hand,
# and the exit status is 1.
set -uo pipefail
wait=${APT_LOCK_WAIT:-600}
what=$1
shift
lock=(-o "DPkg::Lock::Timeout=$wait")
echo "installing $* ($what) with apt-get; if another package manager is busy, waiting for it (up to $wait s)"
# The package lists are refreshed if they can be; the install is tried either way (they may be recent enough).
apt-get -qq "${lock[@]}" update >/dev/null || true
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${lock[@]}" "$@" >/dev/null; then
  echo "cnnlab: could not install $* ($what) with apt-get (its message is above; another package manager may still" \
       "hold the lock): run by hand \`sudo apt-get install $*\`, then run make again" >&2
  exit 1
fi
