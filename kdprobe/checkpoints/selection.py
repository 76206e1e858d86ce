"""Which checkpoints a command works on: globs expanded in order, and the user's --arch / --arch-kwargs
(one for every file, or FILE=... for single files) applied to each path."""
from __future__ import annotations

import fnmatch
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kdprobe.errors import KdprobeError
from kdprobe.ranges import abbreviate, parse_json


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Expand globs (the shell may not have); an unmatched pattern is an error, order kept, no duplicates."""
    out: list[Path] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            hits = sorted(glob.glob(pat, recursive=True))
            if not hits:
                raise KdprobeError(f"no file matches {pat!r}; check the pattern (quote it so the shell passes it through)")
        else:
            hits = [pat]
            if not Path(pat).exists():
                raise KdprobeError(f"checkpoint {pat} does not exist; check the path")
        out += [Path(h) for h in hits if Path(h) not in out]
    if not out:
        raise KdprobeError("no checkpoints given; pass paths or a glob like 'ckpts/*.pt'")
    return out


def json_kwargs(text: str, flag: str) -> dict:
    """A JSON object of keyword arguments (one-line error otherwise)."""
    try:  # nesting, digit counts and non-finite numbers refused before json recurses
        value = parse_json(text, flag)
    except KdprobeError as e:  # say what the option wants, not only that JSON failed
        raise KdprobeError(f"{e}; expected {flag} as a JSON object like '{{\"cfg\": [16, 8]}}'") from None
    if not isinstance(value, dict):
        raise KdprobeError(f"expected {flag} as a JSON object like '{{\"cfg\": [16, 8]}}', got {type(value).__name__} "
                           f"{abbreviate(text)}")
    return value


def _split_file(text: str, flag: str, json_value: bool) -> tuple[str | None, str]:
    """'FILE=VALUE' -> (FILE, VALUE); a plain VALUE -> (None, VALUE)."""
    t = text.strip()
    if json_value:
        if t.startswith("{"):
            return None, t
        for i, ch in enumerate(t):  # FILE={...}: the first '=' followed by a JSON object
            if ch == "=" and t[i + 1:].lstrip().startswith("{"):
                return t[:i], t[i + 1:]
        raise KdprobeError(f"expected {flag} as a JSON object or FILE={{...}}, got {abbreviate(text)}")
    file, eq, name = t.rpartition("=")  # model names never hold '='
    if not name.strip():
        raise KdprobeError(f"expected {flag} as NAME or FILE=NAME, got {abbreviate(text)}")
    return (file, name.strip()) if eq else (None, name.strip())


@dataclass(frozen=True)
class ArchChoice:
    """The --arch / --arch-kwargs of one command: defaults for every file, and FILE= entries for some."""

    arch: str | None = None
    kwargs: dict | None = None
    per_file: tuple = ()  # (pattern, name)
    per_file_kwargs: tuple = ()  # (pattern, dict)

    @staticmethod
    def _matches(pattern: str, path: Path) -> bool:
        if Path(pattern).expanduser().resolve() == path.resolve():
            return True
        return fnmatch.fnmatch(str(path), pattern) or fnmatch.fnmatch(str(path.resolve()), pattern)

    def _pick(self, entries, default, path: Path, flag: str):
        hits = [(p, v) for p, v in entries if self._matches(p, path)]
        if len({json.dumps(v, sort_keys=True) for _, v in hits}) > 1:
            raise KdprobeError(f"{path} is named by several {flag} entries ({', '.join(p for p, _ in hits)}) with "
                               f"different values; name each file once")
        return hits[0][1] if hits else default

    def for_path(self, path) -> dict:
        """{'arch': name or None, 'arch_kwargs': dict or None} for load_checkpoint(path, **...)."""
        path = Path(path)
        return {"arch": self._pick(self.per_file, self.arch, path, "--arch"),
                "arch_kwargs": self._pick(self.per_file_kwargs, self.kwargs, path, "--arch-kwargs")}

    def check_used(self, paths: Sequence) -> None:
        """Every FILE= entry must name one of the command's checkpoints (a typo would silently do nothing)."""
        for flag, entries in (("--arch", self.per_file), ("--arch-kwargs", self.per_file_kwargs)):
            for pattern, _ in entries:
                if not any(self._matches(pattern, Path(p)) for p in paths):
                    raise KdprobeError(f"{flag} {pattern}=... names none of the checkpoints given "
                                       f"({', '.join(str(p) for p in list(paths)[:4])}); check the file name")


def arch_choice(arch: Sequence[str] | str | None, arch_kwargs: Sequence[str] | str | None) -> ArchChoice:
    """Parse --arch (NAME | FILE=NAME, repeatable) and --arch-kwargs (JSON | FILE=JSON, repeatable)."""
    from kdprobe.models.registry import canonical_name

    arch = [arch] if isinstance(arch, str) else list(arch or [])
    arch_kwargs = [arch_kwargs] if isinstance(arch_kwargs, str) else list(arch_kwargs or [])
    default, per_file, default_kw, per_file_kw = None, [], None, []
    for text in arch:
        file, name = _split_file(text, "--arch", json_value=False)
        canonical_name(name)  # unknown names fail here, listing the known ones
        if file is None:
            if default is not None and default != name:
                raise KdprobeError(f"expected one --arch NAME for every file, got {default} and {name}; name single "
                                   "files as --arch FILE=NAME")
            default = name
        else:
            per_file.append((file, name))
    for text in arch_kwargs:
        file, value = _split_file(text, "--arch-kwargs", json_value=True)
        kw = json_kwargs(value, "--arch-kwargs")
        if file is None:
            if default_kw is not None and default_kw != kw:
                raise KdprobeError("expected one --arch-kwargs {...} for every file, got two; name single files as "
                                   "--arch-kwargs FILE={...}")
            default_kw = kw
        else:
            per_file_kw.append((file, kw))
    return ArchChoice(default, default_kw, tuple(per_file), tuple(per_file_kw))
