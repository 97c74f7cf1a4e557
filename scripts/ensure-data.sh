#!/usr/bin/env bash
# Makes sure Fashion-MNIST is where cnnlab looks for it (see `cnnlab data --help`).
# If it is missing and we are root on Debian/Ubuntu, installs Debian's dataset-fashion-mnist
# (files in /usr/share/datasets/fashion-mnist); otherwise prints how to get it and fails.
# Never downloads anything else: `cnnlab data --download` does that, only when asked.
set -euo pipefail
cnnlab=${CNNLAB:-.venv/bin/cnnlab}

if "$cnnlab" data >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST not found: installing Debian's dataset-fashion-mnist"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
elif command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST not found. Install it with: sudo apt-get install dataset-fashion-mnist" >&2
fi
exec "$cnnlab" data  # says where the data is, or lists every place searched and how to get it
