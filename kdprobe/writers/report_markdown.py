"""A study report as Markdown: the headings, notes and tables of report.html, for a paper's draft,
a README or a pull request, with the study's figures as the PNGs of figures/ (kdprobe.writers.report_figures)
where they were written.

A file conversion, not a recomputation: the Markdown is read off the report's HTML, so every
number is the one the HTML shows (the same rounding, the same clipped intervals and footnotes).
"""
from __future__ import annotations

import os
from html.parser import HTMLParser

from kdprobe.files.io import atomic_write_text

_SKIP = {"script", "style", "nav", "svg"}  # figure code and navigation: nothing to read


class _ToMarkdown(HTMLParser):
    def __init__(self, base=None):
        super().__init__(convert_charrefs=True)
        self.base = base  # the folder report.md is written to: figures are embedded where their PNG is there
        self.out: list[str] = []
        self.skip = 0  # depth inside a skipped element
        self.text: list[str] | None = None  # the block being collected (heading, paragraph, item)
        self.rows: list[list[str]] | None = None
        self.cell: list[str] | None = None
        self.pre: list[str] | None = None
        self.kind = ""

    def handle_starttag(self, tag, attrs):
        if self.skip or tag in _SKIP:
            self.skip += tag in _SKIP
            return
        if tag == "div" and "kd-static" in (dict(attrs).get("class") or "").split():
            png, label = dict(attrs).get("data-png"), dict(attrs).get("data-label") or "figure"
            if png and self.base is not None and (self.base / png).is_file():
                self.out.append(f"![{label}]({png})")
            return
        if tag == "table":
            self.rows = []
        elif tag == "tr" and self.rows is not None:
            self.rows.append([])
        elif tag in ("td", "th") and self.rows is not None:
            self.cell = []
        elif tag == "pre":
            self.pre = []
        elif tag in ("h1", "h2", "h3", "p", "li") and self.rows is None:
            self.text, self.kind = [], tag
        elif tag == "br" and self.text is not None:
            self.text.append(" ")

    def handle_endtag(self, tag):
        if self.skip:
            self.skip -= tag in _SKIP
            return
        if tag in ("td", "th") and self.cell is not None and self.rows:
            self.rows[-1].append(" ".join("".join(self.cell).split()).replace("|", "\\|"))
            self.cell = None
        elif tag == "table" and self.rows is not None:
            self._table([r for r in self.rows if r])
            self.rows = None
        elif tag == "pre" and self.pre is not None:
            self.out.append("```\n" + "".join(self.pre).strip("\n") + "\n```")
            self.pre = None
        elif tag == self.kind and self.text is not None:
            text = " ".join("".join(self.text).split())
            if text:
                prefix = {"h1": "# ", "h2": "## ", "h3": "### ", "li": "- "}.get(tag, "")
                self.out.append(prefix + text)
            self.text, self.kind = None, ""

    def handle_data(self, data):
        if self.skip:
            return
        for sink in (self.cell, self.pre, self.text):
            if sink is not None:
                sink.append(data)
                return

    def _table(self, rows: list[list[str]]) -> None:
        if not rows:
            return
        width = max(len(r) for r in rows)
        rows = [r + [""] * (width - len(r)) for r in rows]
        numeric = [all(_numberish(r[i]) for r in rows[1:]) for i in range(width)]
        lines = ["| " + " | ".join(rows[0]) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        self.out.append("\n".join(lines))


def _numberish(text: str) -> bool:
    t = text.replace("±", " ").replace("[", " ").replace("]", " ").replace(",", " ").replace("*", " ").split()
    if not t:
        return True
    try:
        float(t[0].replace("%", ""))
        return True
    except ValueError:
        return t[0] == "-"


def html_to_markdown(page: str, base: str | os.PathLike | None = None) -> str:
    """Headings, paragraphs, list items, tables (numbers right-aligned) and <pre> blocks of an HTML page; with
    base (a folder), each figure whose PNG exists under it as an image."""
    from pathlib import Path

    p = _ToMarkdown(None if base is None else Path(base))
    p.feed(page)
    p.close()
    return "\n\n".join(p.out) + "\n"


def write_report_markdown(result, path: str | os.PathLike) -> None:
    """report.md: report.html's headings, notes and tables (kdprobe.studies.result.StudyResult -> Markdown)."""
    from kdprobe.writers.report import report_html

    atomic_write_text(path, html_to_markdown(report_html(result), base=os.path.dirname(os.path.abspath(path))))
