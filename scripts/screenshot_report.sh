#!/usr/bin/env bash
# Usage: scripts/screenshot_report.sh REPORT.html [OUT.png]
# Renders a `cnnlab report --html` page in headless Chromium (Debian's package `chromium`;
# `make test` installs it when run as root) and writes a full-page screenshot, then prints how
# many images the page has and how many failed to load (a report embeds all of its images, so
# the second number must be 0). Used by tests/test_report.py; run it by hand to look at a report.
set -euo pipefail
html=$(realpath "$1")
out=${2:-${html%.html}.png}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "chromium not found: apt-get install chromium" >&2
  exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile"
       --virtual-time-budget=5000)
"$browser" "${flags[@]}" --window-size=1280,3000 --screenshot="$out" "file://$html" 2>/dev/null
dom=$("$browser" "${flags[@]}" --dump-dom "file://$html" 2>/dev/null)
images=$(grep -o 'data-images="[0-9]*"' <<<"$dom" | grep -o '[0-9]*' || echo "?")
broken=$(grep -o 'data-broken-images="[0-9]*"' <<<"$dom" | grep -o '[0-9]*' || echo "?")
echo "screenshot: $out"
echo "images: $images broken: $broken"
