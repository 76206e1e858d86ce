#!/usr/bin/env bash
# Copy what a reader needs of a finished study into the repository (never the checkpoints):
# summary.json, report.md (the report's tables), and PNG screenshots of the landscape contours
# and the diversity strip plot, taken from the study's own offline HTML figures.
#   usage: scripts/export_results.sh STUDY_DIR DEST_DIR
# report.md and landscapes.html are (re)written from STUDY_DIR/summary.json first: a file
# conversion, nothing is recomputed. Screenshots need Chromium (apt-get install -y chromium).
set -euo pipefail
src=${1:?usage: scripts/export_results.sh STUDY_DIR DEST_DIR}
dest=${2:?usage: scripts/export_results.sh STUDY_DIR DEST_DIR}
[ -f "$src/summary.json" ] || { echo "error: $src/summary.json does not exist; run kdprobe study first" >&2; exit 1; }
py=${PYTHON:-python}
mkdir -p "$dest"
"$py" - "$src" <<'PY'
import json, sys
from pathlib import Path
from kdprobe.studies.result import from_dict
from kdprobe.writers.report import write_landscape_page
from kdprobe.writers.report_markdown import write_report_markdown
src = Path(sys.argv[1])
r = from_dict(json.loads((src / "summary.json").read_text()))
write_report_markdown(r, src / "report.md")
if r.landscapes:
    write_landscape_page(r, src / "landscapes.html")
PY
cp "$src/summary.json" "$src/report.md" "$dest/"
shoot() {  # page, png, WIDTHxHEIGHT: the top of the page, where the 2-D figure is
    local browser
    browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
    if [ -z "$browser" ]; then echo "note: Chromium not found, $2 not made" >&2; return 0; fi
    local profile; profile=$(mktemp -d)
    "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
        --virtual-time-budget=15000 --screenshot="$2" --window-size="${3/x/,}" "file://$(realpath "$1")" >/dev/null 2>&1 || true
    rm -rf "$profile"
    [ -s "$2" ] && echo "wrote $2"
}
[ -f "$src/landscapes.html" ] && shoot "$src/landscapes.html" "$dest/landscapes.png" 1400x${LANDSCAPE_HEIGHT:-700}
[ -f "$src/diversity.html" ] && shoot "$src/diversity.html" "$dest/diversity.png" 1000x450
for f in "$src"/pruning/*/surplus.csv; do [ -f "$f" ] && cp "$f" "$dest/$(basename "$(dirname "$f")")-surplus.csv"; done
echo "exported $src -> $dest"
