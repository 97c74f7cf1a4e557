#!/usr/bin/env bash
# Makes sure Fashion-MNIST, which `make run` trains on, is where cnnlab looks for it (see `cnnlab data --help`).
# If it is missing and we are root on Debian/Ubuntu, installs Debian's dataset-fashion-mnist
# (files in /usr/share/datasets/fashion-mnist) with scripts/apt-install.sh, which waits for another package
# manager's lock and otherwise says what to run by hand; if we are not root, prints the one command to run.
# Never downloads anything else: `cnnlab data --download` does that, only when asked.
set -euo pipefail
cnnlab=${CNNLAB:-.venv/bin/cnnlab}
here=$(dirname "$0")

found() { "$cnnlab" data fashion-mnist >/dev/null 2>&1; }

if found; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST not found: installing Debian's dataset-fashion-mnist"
  "$here/apt-install.sh" "Fashion-MNIST, the data make run trains on" dataset-fashion-mnist
elif command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST not found. Install it with: sudo apt-get install dataset-fashion-mnist" >&2
fi
if found; then
  exit 0
fi
exec "$cnnlab" data  # lists where it looked for each data set and says how to get Fashion-MNIST (exit 2)
