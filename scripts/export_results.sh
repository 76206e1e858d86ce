#!/usr/bin/env bash
# Copy what a reader needs of a finished study into the repository (never the checkpoints):
# summary.json, report.md (the report's tables, embedding the figures) and figures/ (every figure of
# the report as PNG, numbered, with captions.md), drawn with matplotlib from the study's own figures.
#   usage: scripts/export_results.sh STUDY_DIR DEST_DIR
# figures/, report.md and landscapes.html are (re)written from STUDY_DIR/summary.json first: a file
# conversion, nothing is recomputed. No browser needed.
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
from kdprobe.writers.report_figures import write_study_figures
from kdprobe.writers.report_markdown import write_report_markdown
src = Path(sys.argv[1])
r = from_dict(json.loads((src / "summary.json").read_text()))
write_study_figures(r, src / "figures", ("png",))
write_report_markdown(r, src / "report.md")
if r.landscapes:
    write_landscape_page(r, src / "landscapes.html")
PY
cp "$src/summary.json" "$src/report.md" "$dest/"
mkdir -p "$dest/figures"
cp "$src"/figures/*.png "$src/figures/captions.md" "$dest/figures/"
for f in "$src"/pruning/*/surplus.csv; do [ -f "$f" ] && cp "$f" "$dest/$(basename "$(dirname "$f")")-surplus.csv"; done
echo "exported $src -> $dest"
