"""`kdprobe info` and `kdprobe models`: what a checkpoint holds; what the registry knows."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Arch, ArchKwargs, arch_choice, write_json

O = typer.Option


def info(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file.")],
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    json: Annotated[Optional[Path], O(help="Also write everything as JSON.")] = None,
):
    """Show a checkpoint: architecture, size (params, FLOPs, nonzeros), recipe, accuracies, provenance."""
    from kdprobe.api.info import info as run
    from kdprobe.files.outputs import check_outputs

    arch_choice(arch, arch_kwargs).check_used([checkpoint])
    check_outputs("info", {"--json": (json, "json")}, {"CHECKPOINT": checkpoint})
    result = run(checkpoint, arch=arch, arch_kwargs=arch_kwargs)
    ck, size, bad = result.checkpoint, result.size, result.nonfinite
    m, meta, shape = ck.model, ck.meta, size["input_shape"]
    lines = [f"file        {ck.path}  (sha256 {ck.sha256[:16]}...){'  [foreign]' if ck.foreign else ''}",
             f"arch        {m.arch['name']}  {m.arch['kwargs']}",
             *([f"            {_how(ck.detection)}"] if ck.detection is not None else []),
             f"size        {size['params']:,} params ({size['nonzero_params']:,} nonzero), "
             f"{size['macs'] / 1e6:.2f}M MACs ({size['nonzero_macs'] / 1e6:.2f}M nonzero) at input {shape}"]
    if bad is not None:
        lines.append(f"weights     NON-FINITE: nan/inf in {bad} (and maybe others); train, prune, landscape and "
                     "interpolate refuse this file")
    if "image_size" in meta or meta.get("normalization"):
        norm = meta.get("normalization") or {}
        lines.append(f"input       image size {meta.get('image_size') or 'native'}"
                     + (f", mean {norm.get('mean')}, std {norm.get('std')}" if norm else ""))
    for key in ("method", "dataset", "seed", "epochs", "test_acc", "best_acc", "best_epoch", "reported", "fingerprint"):
        if key in meta:
            v = meta[key]
            lines.append(f"{key:<11} {v:.2f}" if isinstance(v, float) else f"{key:<11} {v}")
    if ck.foreign:
        said = ", ".join(f"{k} {_num(meta[k])}" for k in ("epoch", "best_prec1", "acc") if k in meta)
        lines.append(f"file holds  {meta.get('container', '?')} state_dict" + (f"; {said}" if said else "")
                     + (f"; other keys: {', '.join(meta['keys'])}" if meta.get("keys") else ""))
        if meta.get("foreign_options"):
            opts = meta["foreign_options"]
            lines.append("options     " + ", ".join(f"{k}={opts[k]}" for k in list(opts)[:12])
                         + (" ..." if len(opts) > 12 else ""))
    cfg = meta.get("config") or {}
    if cfg:
        lines.append("recipe      " + ", ".join(f"{k}={cfg[k]}" for k in ("preset", "epochs", "batch_size", "lr", "schedule",
                                                                          "milestones", "weight_decay", "augment", "distill") if k in cfg))
    if meta.get("teacher"):
        t = meta["teacher"]
        lines.append(f"teacher     {t.get('path')} ({t.get('method')}, acc {_num(t.get('test_acc'))}, "
                     f"sha256 {str(t.get('sha256'))[:16]}...)")
    ts = meta.get("teachers")
    if isinstance(ts, list) and len(ts) > 1:
        ens = meta.get("teacher_ensemble") or {}
        lines.append(f"teachers    {len(ts)}, the average of their probabilities at T = {ens.get('temperature')}: "
                     + ", ".join(f"{t.get('path')} (sha256 {str(t.get('sha256'))[:16]}...)" for t in ts
                                 if isinstance(t, dict)))
    kd = meta.get("kd")
    if isinstance(kd, dict):
        settings = kd.get("settings") or {}
        given = set(kd.get("given") or {})
        lines.append(f"KD method   {kd.get('method')}: " + ", ".join(
            f"{k}={settings[k]}{'*' if k in given else ''}" for k in settings) + (" (* = set by --kd-settings)"
                                                                                 if given else ""))
        if kd.get("student_layers"):
            lines.append(f"            student {kd.get('student_layers')} {kd.get('student_shapes')} -> teacher "
                         f"{kd.get('teacher_layers')} {kd.get('teacher_shapes')}")
        lines.append(f"            {kd.get('paper')}; {kd.get('reference')}")
    gen = meta.get("generation")
    if isinstance(gen, dict):
        lines.append(f"generation  {gen.get('generation')} of {gen.get('first')}..{gen.get('last')} (born-again chain; teacher: "
                     f"{gen.get('teacher') or 'none, trained from scratch'})")
    fk = meta.get("feature_kd")
    if isinstance(fk, dict):
        lines.append(f"feature KD  student {fk.get('student_layer')} {fk.get('student_map')} -> teacher "
                     f"{fk.get('teacher_layer')} {fk.get('teacher_map')}, compared at {fk.get('compared_at')}, "
                     f"beta {fk.get('beta')}")
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
        from kdprobe.runtime.machine import describe, machine_of

        lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "machine"))
        if machine_of(meta["versions"]):
            lines.append("machine     " + describe(machine_of(meta["versions"])))
    typer.echo("\n".join(lines))
    if json:
        write_json(result.to_dict(), json)


def _how(det) -> str:
    """How a foreign file's architecture was found, for the `arch` line."""
    how = "detected from the tensor names and shapes" if det.how == "detected" else "named with --arch"
    also = f"; same network as {', '.join(det.same_function)}" if det.same_function else ""
    return f"{how} (source: {det.source}{also})"


def _num(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def models():
    """List the registered architectures (and their aliases), then the name sources (torchvision:, python:)."""
    from kdprobe.models import list_models, model_aliases
    from kdprobe.models.registry import list_sources, source_usage

    aliases: dict[str, list[str]] = {}
    for a, c in model_aliases().items():
        aliases.setdefault(c, []).append(a)
    for name in list_models():
        extra = f"  (alias: {', '.join(sorted(aliases[name]))})" if name in aliases else ""
        typer.echo(f"{name}{extra}")
    for prefix, names in list_sources().items():
        usage = source_usage(prefix)
        what = (f"({len(names)} builders: {', '.join(names)})" if names
                else "(your own model: imports and runs MODULE, then calls FACTORY(num_classes=...))")
        typer.echo(f"{usage}  {what}")
