"""`kdprobe info` and `kdprobe models`: what a checkpoint holds; what the registry knows."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import write_json

O = typer.Option


def info(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file.")],
    arch: Annotated[Optional[str], O(help="Architecture of a foreign checkpoint.")] = None,
    json: Annotated[Optional[Path], O(help="Also write everything as JSON.")] = None,
):
    """Show a checkpoint: architecture, size (params, FLOPs, nonzeros), recipe, accuracies, provenance."""
    from kdprobe.checkpoint import load_checkpoint
    from kdprobe.outputs import check_outputs
    from kdprobe.pruning import count_flops, count_nonzero, count_nonzero_flops, count_params

    check_outputs("info", {"--json": (json, "json")}, {"CHECKPOINT": checkpoint})
    ck = load_checkpoint(checkpoint, arch=arch)
    bad = ck.nonfinite()  # shown, not refused: info is how one finds out what is wrong with a file
    m, meta = ck.model, ck.meta
    shape = meta.get("input_shape") or [m.arch["kwargs"].get("in_channels", 3), 32, 32]
    size = {"params": count_params(m), "nonzero_params": count_nonzero(m),
            "macs": count_flops(m, shape), "nonzero_macs": count_nonzero_flops(m, shape), "input_shape": shape}
    lines = [f"file        {ck.path}  (sha256 {ck.sha256[:16]}...){'  [foreign]' if ck.foreign else ''}",
             f"arch        {m.arch['name']}  {m.arch['kwargs']}",
             f"size        {size['params']:,} params ({size['nonzero_params']:,} nonzero), "
             f"{size['macs'] / 1e6:.2f}M MACs ({size['nonzero_macs'] / 1e6:.2f}M nonzero) at input {shape}"]
    if bad is not None:
        lines.append(f"weights     NON-FINITE: nan/inf in {bad} (and maybe others); train, prune, landscape and "
                     "interpolate refuse this file")
    for key in ("method", "dataset", "seed", "epochs", "test_acc", "best_acc", "best_epoch", "reported", "fingerprint"):
        if key in meta:
            v = meta[key]
            lines.append(f"{key:<11} {v:.2f}" if isinstance(v, float) else f"{key:<11} {v}")
    cfg = meta.get("config") or {}
    if cfg:
        lines.append("recipe      " + ", ".join(f"{k}={cfg[k]}" for k in ("preset", "epochs", "batch_size", "lr", "schedule",
                                                                          "milestones", "weight_decay", "augment", "distill") if k in cfg))
    if meta.get("teacher"):
        t = meta["teacher"]
        lines.append(f"teacher     {t.get('path')} ({t.get('method')}, acc {_num(t.get('test_acc'))}, "
                     f"sha256 {str(t.get('sha256'))[:16]}...)")
    if meta.get("init"):
        i = meta["init"]
        lines.append(f"init        {i.get('path')} ({i.get('method')}, sha256 {str(i.get('sha256'))[:16]}...)")
    if meta.get("pruning"):
        p = meta["pruning"]
        lines.append(f"pruning     {p.get('method')}, remaining {p.get('remaining')}, skip {p.get('skip') or 'none'}, "
                     f"from {p.get('source')} (acc {_num(p.get('source_test_acc'))})")
        for key, label in (("params", "params"), ("nonzero", "nonzero params"), ("flops", "MACs"),
                           ("nonzero_flops", "nonzero MACs")):
            b, a = p.get(f"{key}_before"), p.get(f"{key}_after")
            if isinstance(b, int) and isinstance(a, int):
                lines.append(f"            {label:<15} {b:>14,} -> {a:>14,}  ({a / max(b, 1):.3f}x)")
    if ck.extra:
        lines.append("extra       " + ", ".join(sorted(ck.extra)))
    if meta.get("versions"):
        lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    typer.echo("\n".join(lines))
    if json:
        write_json({"path": str(ck.path), "sha256": ck.sha256, "arch": m.arch, "size": size, "nonfinite": bad,
                    "meta": {k: v for k, v in meta.items()}, "extra": sorted(ck.extra)}, json)


def _num(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def models():
    """List the registered architectures (and their aliases)."""
    from kdprobe.models import list_models, model_aliases

    aliases: dict[str, list[str]] = {}
    for a, c in model_aliases().items():
        aliases.setdefault(c, []).append(a)
    for name in list_models():
        extra = f"  (alias: {', '.join(aliases[name])})" if name in aliases else ""
        typer.echo(f"{name}{extra}")
