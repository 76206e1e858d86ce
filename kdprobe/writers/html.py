"""Small HTML pieces the report pages share: escaping, number formatting, links and tables."""
from __future__ import annotations

import html
import math
import os


def _e(text) -> str:
    return html.escape(str(text))


def _f(v, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, fmt)


def _link(rel: str | None) -> str:
    if not rel:
        return "–"
    return f'<a href="{html.escape(rel.replace(os.sep, "/"), quote=True)}">{_e(os.path.basename(rel))}</a>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
