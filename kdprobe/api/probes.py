"""The probes of a set of checkpoints on one dataset: agreement, ensembles, cka, calibration, sharpness.

Each takes checkpoints as paths or globs, `kdprobe.Checkpoint` objects or plain `torch.nn.Module`s (then
`dataset=` names their data), fits the dataset's images to every model (size, normalization) and returns a
`kdprobe.ProbeResult`. Keyword arguments are the CLI's options, with the CLI's defaults."""
from __future__ import annotations

from kdprobe.api.results import ProbeResult

__all__ = ["agreement", "ensembles"]

def _agreement_run(checkpoints, *, ensembles_only: bool, split, samples, group_by, reference, confidence, interval,
                   max_subsets, bins, batch_size, seed, note=None, **load):
    from kdprobe.errors import KdprobeError
    from kdprobe.probes.checkpoint_set import cached_logits, open_set
    from kdprobe.probes.sets import AGREEMENT_NOTES, agreement_part, group_ensembles
    from kdprobe.probes.tables import ProbeTables, ensemble_tables

    if max_subsets < 1 or bins < 1:
        raise KdprobeError(f"expected --max-subsets >= 1 and --bins >= 1, got {max_subsets} and {bins}")
    ps, ref = open_set(checkpoints, interval=interval, reference=reference, group_by=group_by, split=split,
                       samples=samples, min_count=1 if ensembles_only else 2, note=note, **load)
    cache = cached_logits(ps, batch_size)
    labels = cache.labels
    log_probs = {m.path: cache[m.path].log_probs() for m in ps.members}
    stat = dict(reference=ref, confidence=confidence, interval=interval)
    part = {} if ensembles_only else agreement_part(ps.members, log_probs, labels, bins=bins, **stat)
    ens, tests = group_ensembles(ps.members, log_probs, labels, max_subsets=max_subsets, seed=seed, bins=bins, **stat)
    settings = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(labels)),
                "group_by": group_by, "reference": ref, "confidence": confidence, "interval": interval, "bins": bins,
                "max_subsets": max_subsets, "seed": seed, "checkpoints": len(ps.members),
                "forward_passes": cache.forward_passes, **AGREEMENT_NOTES}
    command = "ensembles" if ensembles_only else "agreement"
    tables = ProbeTables(command, settings, {**part, **ensemble_tables(ens, tests)})
    return ProbeResult(tables, "ensemble_gains" if ensembles_only else "pairs", ens)


def agreement(checkpoints, *, split: str = "test", samples: int = 0, group_by: str = "method",
              reference: str | None = None, confidence: float = 0.99, interval: str = "t", max_subsets: int = 100,
              bins: int = 15, batch_size: int = 500, seed: int = 0, arch=None, arch_kwargs=None, image_size=None,
              dataset: str | None = None, data_dir=None, device: str = "auto", note=None) -> ProbeResult:
    """Function-space agreement of every pair of checkpoints (disagreement, normalized disagreement, symmetric
    KL, Jensen-Shannon) and the ensembles of each group (softmax average, gain over the mean member per
    size k), from ONE forward pass per checkpoint.

    checkpoints: at least 2 (paths, globs, kdprobe.Checkpoint objects or nn.Modules with dataset=).
    reference: the group others are tested against ('none' for no tests; default scratch where present).
    Tables: pairs (main), pair_types, checkpoints, groups, ensembles (the size curve), ensemble_gains,
    ensemble_subsets, gain_tests. `details` holds {group: GroupEnsemble}. note(text) receives remarks (default: stderr)."""
    return _agreement_run(checkpoints, ensembles_only=False, split=split, samples=samples, group_by=group_by,
                          reference=reference, confidence=confidence, interval=interval, max_subsets=max_subsets,
                          bins=bins, batch_size=batch_size, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          image_size=image_size, dataset=dataset, data_dir=data_dir, device=device, note=note)


def ensembles(checkpoints, *, split: str = "test", samples: int = 0, group_by: str = "method",
              reference: str | None = None, confidence: float = 0.99, interval: str = "t", max_subsets: int = 100,
              bins: int = 15, batch_size: int = 500, seed: int = 0, arch=None, arch_kwargs=None, image_size=None,
              dataset: str | None = None, data_dir=None, device: str = "auto", note=None) -> ProbeResult:
    """The ensembles of each group alone (agreement's ensemble tables, without the pairs): accuracy, NLL and
    ECE of the mean member and of the softmax-average ensemble per size k, the gain with its jackknife
    interval and its test against the reference group's gain. Main table: ensemble_gains."""
    return _agreement_run(checkpoints, ensembles_only=True, split=split, samples=samples, group_by=group_by,
                          reference=reference, confidence=confidence, interval=interval, max_subsets=max_subsets,
                          bins=bins, batch_size=batch_size, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          image_size=image_size, dataset=dataset, data_dir=data_dir, device=device, note=note)
