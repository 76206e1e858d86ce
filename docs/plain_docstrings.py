"""A griffe extension for the API reference: kdprobe's docstrings are plain text, not markdown.

They write `values[i][j]`, `<path>` and `**kwargs` meaning exactly those characters, which markdown would
turn into a broken cross-reference, an HTML tag or bold text. This escapes them outside backtick spans,
so the reference shows what the docstring says."""
from __future__ import annotations

import re

import griffe

_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_SPECIAL = re.compile(r"([\[\]*<>_])")


def plain(text: str) -> str:
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out.append(_SPECIAL.sub(r"\\\1", text[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_SPECIAL.sub(r"\\\1", text[pos:]))
    return "".join(out)


class PlainDocstrings(griffe.Extension):
    """Escape markdown's special characters in every docstring griffe reads."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
