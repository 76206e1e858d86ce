"""The report's ensemble-perspective sections: the verdicts first, then one section per probe with its
summary table and its figure (kdprobe.writers.probe_plots, SVG traces only, no WebGL).

Pure formatting of a StudyResult: every number and every verdict was computed by the study
(kdprobe.probes.sets, kdprobe.studies.ensemble_reading). Interval ends are shown clipped to what a metric
can take (marked *); the files keep the raw ends.
"""
from __future__ import annotations

import math

from kdprobe.probes.diversity_table import clip_end
from kdprobe.studies.ensemble_reading import PREDICTIONS, headline
from kdprobe.writers.landscape_plot import figure_div
from kdprobe.writers.html import _e, _f, _link, _table

from kdprobe.writers.probe_plots import BOUNDS, UNBOUNDED  # noqa: E402 - one table of bounds for tables and figures
from kdprobe.writers.report_figures import readable as _readable  # noqa: E402 - the figure's pair types
TITLES = {"agreement": "Function-space agreement", "ensembles": "Ensembles and the ensemble gain",
          "calibration": "Calibration", "cka": "Representation similarity (linear CKA)",
          "sharpness": "Sharpness of the training loss"}


def _ci(row: dict | None, digits: str, metric: str, clipped: list) -> str:
    """'mean [low, high]' of one summary record, the ends clipped to the metric's range (marked *)."""
    if row is None:
        return "–"
    bounds = BOUNDS.get(metric, UNBOUNDED)
    (lo, c1), (hi, c2) = clip_end(row.get("low"), bounds), clip_end(row.get("high"), bounds)
    if c1 or c2:
        clipped.append(metric)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return _f(row.get("mean"), digits)
    return f"{_f(row.get('mean'), digits)} [{_f(lo, digits)}{'*' if c1 else ''}, {_f(hi, digits)}{'*' if c2 else ''}]"


def _pair_type_table(tables, metrics: list[str], clipped: list) -> str:
    rows = tables.table("pair_types")
    keys = list(dict.fromkeys(r["key"] for r in rows))
    out = []
    for k in keys:
        by = {r["metric"]: r for r in rows if r["key"] == k}
        first = by.get(metrics[0]) or next(iter(by.values()))
        out.append([_e(k), str(first["n_pairs"]), str(first["n_checkpoints"])]
                   + [_ci(by.get(m), ".4f", m, clipped) for m in metrics]
                   + [_f((by.get(metrics[0]) or {}).get("diff"), "+.4f"),
                      _f((by.get(metrics[0]) or {}).get("p_holm"), ".3g")])
    return _table(["pair type", "pairs", "checkpoints"] + metrics + [f"diff {metrics[0]} vs reference", "p (Holm)"],
                  out)


def _group_table(tables, metrics: list[str], clipped: list, digits: str = ".4f") -> str:
    rows = tables.table("groups")
    out = []
    for g in dict.fromkeys(r["group"] for r in rows):
        by = {r["metric"]: r for r in rows if r["group"] == g}
        first = by.get(metrics[0], {})
        out.append([_e(g), str(first.get("n", "–"))] + [_ci(by.get(m), digits, m, clipped) for m in metrics]
                   + [_f(first.get("p_holm"), ".3g"), _f(first.get("hedges_g"), ".2f")])
    return _table(["method", "n"] + metrics + [f"p (Holm) {metrics[0]}", f"g {metrics[0]}"], out)


def _ensemble_table(tables, clipped: list) -> str:
    gains = tables.table("ensemble_gains")
    tests = {(t["group"], t["metric"]): t for t in tables.table("gain_tests")}
    curve = tables.table("ensembles")
    out = []
    for g in dict.fromkeys(r["group"] for r in gains):
        full = max((r for r in curve if r["group"] == g), key=lambda r: r["k"], default={})
        row = [_e(g), str(full.get("k", "–"))]
        for m in ("acc", "nll", "ece"):
            r = next((x for x in gains if x["group"] == g and x["metric"] == m), None)
            row += [f"{_f(full.get(f'member_{m}'), '.4f')} → {_f(full.get(m), '.4f')}",
                    _ci(r and {**r, "mean": r["gain"]}, "+.4f", f"gain_{m}", clipped),
                    _f((tests.get((g, m)) or {}).get("p_holm"), ".3g")]
        out.append(row)
    head = ["method", "n"]
    for m in ("acc", "nll", "ece"):
        head += [f"{m}: mean member → ensemble", f"gain {m}", f"p (Holm) gain {m}"]
    return _table(head, out)


def _summary(name: str, tables, clipped: list) -> str:
    if name == "agreement":
        return _pair_type_table(tables, ["disagreement", "normalized_disagreement", "js"], clipped)
    if name == "cka":
        return _pair_type_table(tables, ["cka"], clipped)
    if name == "ensembles":
        return _ensemble_table(tables, clipped)
    if name == "calibration":
        return _group_table(tables, ["ece", "nll", "brier", "acc"], clipped)
    return _group_table(tables, ["top_eigenvalue", "trace"], clipped, ".4g")


def _setting_note(name: str, st: dict) -> str:
    base = (f"{st.get('checkpoints')} checkpoints on {_e(st.get('dataset'))}, split {_e(st.get('split'))}, "
            f"{st.get('samples_used')} samples; intervals {st.get('confidence', 0.99) * 100:g}% "
            f"{_e(st.get('interval'))}")
    own = {"agreement": "unit = one checkpoint (pairs share checkpoints: delete-one-checkpoint jackknife); p = "
                        "difference to the reference pair type, jackknife t, Holm over pair types",
           "cka": f"layer {_e(st.get('layer'))}, {_e(st.get('estimator'))} unbiased HSIC; unit = one checkpoint "
                  "(delete-one-checkpoint jackknife); p vs the reference pair type, Holm over pair types",
           "ensembles": f"softmax average; gain = ensemble − mean member, jackknife over checkpoints (needs 3); p = "
                        f"gain vs the reference's gain, Holm over methods; up to {st.get('max_subsets')} subsets per k",
           "calibration": f"{st.get('bins')} equal-width bins, top-label ECE; unit = one checkpoint; p = Welch vs "
                          "the reference, Holm over methods",
           "sharpness": f"mean cross-entropy, bn = {_e(st.get('bn'))}, top eigenvalue by power iteration (≤ "
                        f"{st.get('iterations')} steps, tol {st.get('tol')}), trace from {st.get('trace_samples')} "
                        "Rademacher vectors; unit = one checkpoint; p = Welch vs the reference, Holm over methods"}
    extra = f"; {st.get('forward_passes')} forward passes (one logit cache)" if name in (
        "agreement", "ensembles", "calibration") else ""
    return f"{base}; {own[name]}{extra}."


def verdicts_html(r) -> str:
    """The 'Ensemble reading' section: each probe's prediction, then every verdict in one table."""
    if not r.verdicts:
        return ""
    probes = list(dict.fromkeys(v.probe for v in r.verdicts))
    items = []
    for name in probes:
        pred, ref = PREDICTIONS[name], next(v.reference for v in r.verdicts if v.probe == name)
        items.append(f"<li><b>{_e(name)}</b>: {_e(pred.claim.format(kd='KD', ref=ref))}. Compared: "
                     f"{_e(pred.quantity)}; test: {_e(pred.test.format(kd='KD', ref=ref))}.</li>")
    rows = [[_e(v.probe), _e(v.method), _f(v.value, ".4g"), _f(v.reference_value, ".4g"), _f(v.diff, "+.4g"),
             _f(v.p_value, ".3g"), _f(v.p_holm, ".3g"), f"<b>{_e(v.verdict)}</b>", _e(v.reason)] for v in r.verdicts]
    return ("<h2 id='reading'>The ensemble reading</h2><p class='note'>What the reading of KD as an ensemble "
            "predicts for each probe (README, 'Studies'), tested on these checkpoints: supports = the p-value, "
            "Holm-adjusted over the KD methods of the probe, is below alpha and the difference has the predicted "
            "sign; does not support = below alpha with the opposite sign; inconclusive = otherwise (or no test)."
            f"</p><ul class='note'>{''.join(items)}</ul>"
            + _table(["probe", "KD method", "KD value", "reference value", "difference", "p", "p (Holm)",
                      "verdict", "why"], rows) + answers_html(r))


def answers_html(r) -> str:
    """Per KD method: does it behave like an ensemble in these probes? (the verdicts above, tallied)."""
    from kdprobe.studies.ensemble_reading import method_answers

    answers = method_answers(r.verdicts)
    if not answers:
        return ""
    rows = [[_e(a.method), f"<b>{_e(a.answer)}</b>", _e(", ".join(a.supports) or "-"), _e(", ".join(a.does_not) or "-"),
             _e(", ".join(a.inconclusive) or "-")] for a in answers]
    return ("<h3 id='answers'>Per method: does it behave like an ensemble in these probes?</h3><p class='note'>The "
            "verdicts above, per KD method: yes = every probe supports the ensemble reading; in part = some do; no = "
            "none does and at least one goes against it; not shown = every probe inconclusive.</p>"
            + _table(["KD method", "behaves like an ensemble", "supported by", "against it", "inconclusive"], rows))


def probes_html(r, figs: dict | None = None) -> str:
    """One section per probe: the verdict sentence, the summary table, the figure (numbered, with its caption:
    figs {key: StudyFigure} from kdprobe.writers.report_figures) and links to its files."""
    from kdprobe.writers.report_figures import figure_block
    from kdprobe.writers.colors import study_colors
    from kdprobe.writers.probe_plots import probe_figure

    parts = []
    for name, tables in r.probes.items():
        clipped: list = []
        summary = _summary(name, tables, clipped)
        vs = [v for v in r.verdicts if v.probe == name]
        links = " · ".join(_link(p) for p in (f"{name}.json", f"{name}.html") if p in r.files)
        note = (f" Interval ends marked * are clipped to what {', '.join(sorted(set(clipped)))} can take; the "
                "files keep the raw ends.") if clipped else ""
        figure, left_out = _readable(tables)
        if left_out:
            note += (f" The figure leaves out the {left_out} between-method pair types (they are in the table and "
                     f"in {name}.html).")
        parts.append(f"<h2 id='{name}'>{TITLES[name]}</h2>"
                     f"<p><b>Ensemble reading</b> ({_e(PREDICTIONS[name].test.format(kd='KD', ref='reference'))}): "
                     f"{_e(headline(vs))}</p>" + summary
                     + f"<p class='note'>{_setting_note(name, tables.settings)}{note} Files: {links}</p>"
                     + (figure_div(figs[name].figure) + figure_block(figs[name]) if figs and name in figs
                        else figure_div(probe_figure(figure, study_colors(r.settings)))))
    return "".join(parts)
