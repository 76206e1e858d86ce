"""`kdprobe surplus`: how much more KD gains after pruning, from a results table."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import table

O = typer.Option


def surplus(
    results_csv: Annotated[Path, typer.Argument(help="UTF-8 CSV with header model,setting,train_type,unpruned,"
                                                     "finetuned,post_distill,pre_post,self_distill (one row per run; "
                                                     "extra columns such as seed are ignored; # starts a comment "
                                                     "line). Accuracies as fractions (0-1); a file in percent "
                                                     "(0-100) is converted, a mix is refused.")],
    csv: Annotated[Optional[Path], O(help="Write the surplus table as CSV.")] = None,
    json: Annotated[Optional[Path], O(help="Write the surplus table as JSON.")] = None,
):
    """Surplus = (SelfDistill - Finetuned_scratch) - (Unpruned_KD - Unpruned_scratch), averaged over runs."""
    from kdprobe.api.diversity import surplus as run
    from kdprobe.files.outputs import check_outputs
    from kdprobe.writers.surplus_files import write_surplus_csv, write_surplus_json

    check_outputs("surplus", {"--csv": (csv, "csv"), "--json": (json, "json")}, {"RESULTS_CSV": results_csv})
    result = run(results_csv, note=lambda text: typer.echo(text, err=True))
    typer.echo(surplus_table(result.rows))
    if csv:
        write_surplus_csv(result.rows, csv)
    if json:
        write_surplus_json(result.rows, json)


def _pm(mean, se) -> str:
    if mean is None:
        return "-"
    return f"{mean:+.4f}" + ("" if se is None else f" ± {se:.4f}")


def surplus_table(rows) -> str:
    """Surplus rows (kdprobe.probes.surplus.SurplusRow) as a text table plus the formula legend."""
    shown = []
    for r in rows:
        n = f"{r.unpruned_scratch_n}/{r.finetuned_scratch_n}/{r.unpruned_kd_n}/{r.self_distill_n}"
        shown.append({"model": r.model, "setting": r.setting, "kd": r.kd_type,
                      "gain unpruned": _pm(r.gain_unpruned, None), "gain pruned": _pm(r.gain_pruned, None),
                      "surplus ± se": _pm(r.surplus, r.surplus_se), "runs us/fs/uk/sd": n})
    return (table(shown) + "\nsurplus = (self_distill - finetuned_scratch) - (unpruned_kd - unpruned_scratch); "
            "se = sqrt(sum of the 4 squared standard errors), '-' = inputs missing; accuracies and gains as fractions "
            "(0.0123 = 1.23 points)")
