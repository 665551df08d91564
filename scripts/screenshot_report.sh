#!/usr/bin/env bash
# Headless Chromium screenshot of a `cvvae report` page, to look at it as a person would.
#
#   scripts/screenshot_report.sh REPORT_DIR [OUT.png] [WIDTHxHEIGHT]
#
# OUT.png defaults to REPORT_DIR.png next to the report directory (the report itself is left untouched); the window
# is 1280x2000 unless given. Needs Debian's chromium (apt-get install -y chromium). Nothing is fetched: the page
# and its images are local files, and background networking, sync and updates are off.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT_DIR [OUT.png] [WIDTHxHEIGHT]" >&2
    exit 2
fi
dir=$(cd "$1" && pwd)
page="$dir/index.html"
out=${2:-"$dir.png"}
size=${3:-1280x2000}
if [[ ! -f "$page" ]]; then
    echo "error: $page does not exist; make the report with: cvvae report INPUT --model M -o DIR" >&2
    exit 2
fi
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z "$browser" ]]; then
    echo "error: chromium is not installed (apt-get update && apt-get install -y chromium)" >&2
    exit 3
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
out_abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
rm -f "$out_abs"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --window-size="${size/x/,}" --screenshot="$out_abs" "file://$page" \
    >/dev/null 2>&1 || true  # chromium may exit non-zero on harmless shutdown noise; the file decides
if [[ ! -s "$out_abs" ]]; then
    echo "error: chromium wrote no screenshot to $out_abs" >&2
    exit 1
fi
echo "$out_abs"
