"""What an architecture recorded by an older kdprobe checkpoint format means today.

A checkpoint stores `arch = {name, kwargs}`; when a name's meaning changes, the old files
must still rebuild the network they were trained as. `upgrade_arch` maps (name, kwargs) of a
checkpoint of format `version` to today's registry.

Format 1 -> 2: `resnetXXa` used to subsample its option-A shortcut (`x[:, :, ::2, ::2]`);
from format 2 it is Li et al.'s AvgPool2d shortcut and records `shortcut_a` in its kwargs.
A format-1 `resnetXXa` without that kwarg is therefore `resnetXXa-subsample`.
"""
from __future__ import annotations

import re

_OPTION_A = re.compile(r"resnet\d+a")


def upgrade_arch(name: str, kwargs: dict, version: int) -> tuple[str, dict]:
    """(name, kwargs) of a checkpoint written in format `version`, as today's registry names them."""
    kwargs = dict(kwargs)
    if version < 2 and _OPTION_A.fullmatch(str(name)) and "shortcut_a" not in kwargs:
        return f"{name}-subsample", {**kwargs, "shortcut_a": "subsample"}
    return name, kwargs
