#!/usr/bin/env bash
# Open a kdprobe study report (or a landscape .html) in headless Chromium: fail on JavaScript
# errors, on plotly's "WebGL is not supported" placeholder (it blanks a whole figure), and on
# figures that were not drawn; save a screenshot.
#   usage: scripts/check_report.sh DIR/report.html [screenshot.png] [WIDTHxHEIGHT]
#   NO_WEBGL=1 scripts/check_report.sh ...   checks the page as a browser without WebGL sees it:
#   every 2-D figure must still draw, and 3-D views must leave kdprobe's one-line note instead.
# Exit 0: no "Uncaught" console error and all figures drawn; 1: errors; 0 with a note when
# Chromium is not installed (it is optional: apt-get install -y chromium).
set -euo pipefail

report=${1:?usage: scripts/check_report.sh DIR/report.html [screenshot.png] [WIDTHxHEIGHT]}
shot=${2:-${report%.html}.png}
size=${3:-1400x2400}
[ -f "$report" ] || { echo "error: $report does not exist; run kdprobe study first" >&2; exit 1; }

browser=""
for b in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$b" >/dev/null 2>&1; then browser=$b; break; fi
done
if [ -z "$browser" ]; then
    echo "note: Chromium not found, report not checked; install it with: apt-get install -y chromium" >&2
    exit 0
fi

url="file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
profile=$(mktemp -d)
logs=$(mktemp -d)
trap 'rm -rf "$profile" "$logs"' EXIT
# offline and quiet: no network, no first-run UI, a throwaway profile; the virtual time budget
# lets plotly finish drawing (ms of page time, not wall time)
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile"
       --virtual-time-budget=15000)
if [ -n "${NO_WEBGL:-}" ]; then flags+=(--disable-webgl --disable-3d-apis); fi

"$browser" "${flags[@]}" --enable-logging=stderr --v=0 --dump-dom "$url" >"$logs/dom.html" 2>"$logs/console.txt" || true
"$browser" "${flags[@]}" --screenshot="$shot" --window-size="${size/x/,}" "$url" >/dev/null 2>&1 || true

errors=$(grep -E "Uncaught|CONSOLE.*(Error|error)" "$logs/console.txt" || true)
figures=$( (grep -o 'class="plotly-graph-div' "$logs/dom.html" || true) | wc -l)
drawn=$( (grep -o 'class="main-svg"' "$logs/dom.html" || true) | wc -l)
nogl=$( (grep -o 'class="no-webgl"' "$logs/dom.html" || true) | wc -l)  # plotly's placeholder div
skipped=$( (grep -o 'class="note kd-no-webgl"' "$logs/dom.html" || true) | wc -l)  # kdprobe's note
echo "report: $report"
echo "plotly figures: $figures, drawn svg layers: $drawn, 3-D views left out for lack of WebGL: $skipped"
[ -f "$shot" ] && echo "screenshot: $shot ($(du -k "$shot" | cut -f1) KB)"
status=0
if [ -n "$errors" ]; then
    echo "JavaScript errors:" >&2
    echo "$errors" >&2
    status=1
fi
if [ "$nogl" -gt 0 ]; then
    echo "error: $nogl figure(s) show plotly's \"WebGL is not supported\" instead of a plot; 2-D views must not need WebGL" >&2
    status=1
fi
if [ "$figures" -gt 0 ] && [ "$drawn" -lt "$figures" ]; then
    echo "error: $figures figures but only $drawn drawn; open the report in a browser to see why" >&2
    status=1
fi
[ $status -eq 0 ] && echo "ok: no JavaScript errors"
exit $status
