#!/usr/bin/env bash
# Write OUT's report and screenshot it in headless Chromium (Debian: apt-get install chromium); fails when
# the page logs anything to the browser console. The README's images come from this:
#   bash scripts/screenshot_report.sh out/mined docs/img/report-mine.png 1250
#   bash scripts/screenshot_report.sh out/pretrain docs/img/report-pretrain.png 940
set -euo pipefail
out=$1 png=$2 height=${3:-1400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) || {
  echo "error: no Chromium found; install it (Debian: apt-get install chromium)" >&2; exit 2; }
page=$(.venv/bin/splinter report "$out" | sed -n 's/^report: //p')
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
log=$("$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
  --user-data-dir="$profile" --window-size="1200,$height" --enable-logging=stderr --v=0 \
  --screenshot="$png" "file://$(realpath "$page")" 2>&1 >/dev/null)
if grep -E "CONSOLE|Uncaught" <<<"$log"; then
  echo "error: $page logged to the browser console (above)" >&2; exit 1
fi
echo "wrote $png ($(wc -c <"$png") bytes) from $page"
