"""scripts/check_report.sh checks each figure of a report: it passes a real report and fails a copy in which
one figure was drawn with empty data and another never drawn, naming both (issue 20 item 4).

The real report is the demo study's (`kdprobe study demo`: diversity, contour maps, 3-D views), its
summary.json kept in tests/data and written by today's report writer; the browser is Debian's Chromium,
skipped where it is not installed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_report.sh"
SUMMARY = ROOT / "tests" / "data" / "demo-summary.json"
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

pytestmark = pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed: apt-get install -y chromium")


def _check(page: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), str(page), "-"], capture_output=True, text=True, env=env, timeout=300)


def _calls(page: str) -> list[tuple[int, int, int]]:
    """(start of 'Plotly.newPlot(', start and end of its data array) of every figure drawn on the page."""
    out, dec = [], json.JSONDecoder()
    for m in re.finditer(r"Plotly\.newPlot\(\s*(?:\"[^\"]*\"|el)\s*,\s*", page):
        if page[m.end()] != "[":
            continue
        _, end = dec.raw_decode(page, m.end())
        out.append((m.start(), m.end(), end))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from kdprobe.studies.result import from_dict
    from kdprobe.writers.report import write_report

    folder = tmp_path_factory.mktemp("report")
    write_report(from_dict(json.loads(SUMMARY.read_text())), folder / "report.html")
    return folder / "report.html"


def test_a_real_report_passes(report):
    r = _check(report)
    assert r.returncode == 0, r.stdout + r.stderr
    page = report.read_text()
    n = len(_calls(page)) + page.count('class="kd-webgl"')  # the 3-D views draw from their WebGL guard
    assert n == 3 and f"figures: {n}," in r.stdout and "ok: every figure drawn" in r.stdout


def test_a_blank_and_an_undrawn_figure_fail_by_name(report, tmp_path):
    page = report.read_text()
    calls = _calls(page)
    (_, a0, a1), (b_call, _, _) = calls[0], calls[1]
    data = json.loads(page[a0:a1])
    blank = json.dumps([{"type": t.get("type", "scatter"), "x": [], "y": []} for t in data])  # drawn, no data
    # figure 2's drawing call does nothing: its div stays empty (an undrawn figure)
    copy = page[:b_call] + "(function () {})(" + page[b_call + len("Plotly.newPlot("):]
    copy = copy[:a0] + blank + copy[a1:]
    bad = tmp_path / "report.html"
    bad.write_text(copy)
    r = _check(bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"error: figure 1 \([^)]*\): drawn with no data", r.stderr), r.stderr
    assert re.search(r"error: figure 2 \([^)]*\): not drawn", r.stderr), r.stderr
    assert len(re.findall(r"^error: figure", r.stderr, re.M)) == 2  # every other figure still passes
