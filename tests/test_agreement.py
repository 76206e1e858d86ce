"""Agreement, pair types, pair-type statistics and ensembles against hand-computed values and scipy."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from kdprobe.errors import KdprobeError
from kdprobe.probes.pairs import Member, classify, summarize_pair_types
from kdprobe.probes.agreement import agreement, pairwise_agreement
from kdprobe.probes.calibration import metrics
from kdprobe.probes.ensemble import compare_gains, ensemble_log_probs, group_ensemble


def _lp(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def _random_logp(seed, n=50, c=4, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), 1)


def test_agreement_by_hand_and_against_scipy():
    a = _lp([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    b = _lp([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    y = torch.tensor([0, 1, 0, 1])
    r = agreement(a, b, y)
    # predictions a: 0 1 2 0, b: 0 2 2 1 -> differ on 2 of 4; errors a 2/4, b 2/4
    assert r.disagreement == 0.5 and r.err_a == 0.5 and r.err_b == 0.5
    assert r.normalized_disagreement == pytest.approx(0.5 / 0.5)
    p, q = a.exp().numpy(), b.exp().numpy()
    assert r.js == pytest.approx(np.mean([jensenshannon(pi, qi) ** 2 for pi, qi in zip(p, q)]), rel=1e-10)
    assert r.sym_kl == pytest.approx(np.mean([entropy(pi, qi) + entropy(qi, pi) for pi, qi in zip(p, q)]), rel=1e-10)


def test_self_agreement_zero_js_symmetric_and_bounded():
    a, b = _random_logp(0), _random_logp(1, scale=30.0)
    y = torch.zeros(50, dtype=torch.long)
    same = agreement(a, a, y)
    assert same.disagreement == 0.0 and same.js == pytest.approx(0.0, abs=1e-15)
    assert same.sym_kl == pytest.approx(0.0, abs=1e-15)
    assert agreement(a, b, y).js == pytest.approx(agreement(b, a, y).js, rel=1e-14)
    # disjoint one-hot predictions reach log 2, never more
    one_hot = lambda rows: torch.log_softmax(torch.tensor(rows * 3, dtype=torch.float64), 1)  # noqa: E731
    far = agreement(one_hot([[80.0, 0.0]]), one_hot([[0.0, 80.0]]), torch.zeros(3, dtype=torch.long))
    assert far.js == pytest.approx(math.log(2), abs=1e-12) and far.js <= math.log(2)
    assert far.disagreement == 1.0 and math.isfinite(far.sym_kl)
    perfect = agreement(a, a, a.argmax(1))
    assert math.isnan(perfect.normalized_disagreement)  # both errors 0: the ratio is undefined, not inf


def test_pair_classification_finds_the_teacher_by_sha256():
    t = Member("t.pt", "scratch", "sha-t")
    s = Member("s.pt", "kd-label", "sha-s", teacher_sha256="sha-t")
    o = Member("o.pt", "scratch", "sha-o")
    assert classify(t, s)[2:] == ("student-teacher", "kd-label->scratch") and classify(t, s)[0] is s
    assert classify(s, o)[2:] == ("between", "kd-label|scratch")
    assert classify(t, o)[2:] == ("within", "scratch")


def test_pairwise_and_pair_type_statistics():
    members = [Member(f"s{i}", "scratch", f"h{i}") for i in range(3)] + \
              [Member(f"k{i}", "kd", f"hk{i}", teacher_sha256=f"h{i}") for i in range(3)]
    lps = {m.path: _random_logp(i) for i, m in enumerate(members)}
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(9))
    pairs = pairwise_agreement(members, lps, y)
    assert len(pairs) == 15
    kinds = {p.key for p in pairs}
    assert kinds == {"within scratch", "within kd", "between kd|scratch", "student-teacher kd->scratch"}
    st = {s.key: s for s in summarize_pair_types(pairs, "disagreement", reference="within scratch")}
    within = [p.metrics["disagreement"] for p in pairs if p.key == "within scratch"]
    assert st["within scratch"].mean == pytest.approx(np.mean(within)) and st["within scratch"].n_pairs == 3
    assert st["student-teacher kd->scratch"].n_pairs == 3 and st["between kd|scratch"].n_pairs == 6
    # naive delete-one-checkpoint loop for the within-scratch type
    loo = [np.mean([p.metrics["disagreement"] for p in pairs if p.key == "within scratch" and u not in (p.a, p.b)])
           for u in ("s0", "s1", "s2")]
    se = math.sqrt(2 / 3 * sum((v - np.mean(loo)) ** 2 for v in loo))
    assert st["within scratch"].se == pytest.approx(se, rel=1e-12)
    assert math.isnan(st["within scratch"].p_value) and 0 <= st["within kd"].p_holm <= 1
    d = st["within kd"].mean - st["within scratch"].mean
    assert st["within kd"].diff == pytest.approx(d)
    with pytest.raises(KdprobeError, match="missing"):
        pairwise_agreement(members, {}, y)


def test_ensemble_of_one_is_the_model_and_two_average_probabilities():
    a, b = _random_logp(0), _random_logp(1)
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ensemble_log_probs([a]), a, atol=1e-15, rtol=0)
    two = ensemble_log_probs([a, b]).exp()
    assert torch.allclose(two, (a.exp() + b.exp()) / 2, atol=1e-14, rtol=0)
    one = group_ensemble("g", ["a"], [a], y)
    assert one.full == metrics(a, y) and one.curve[0].gain == {"acc": 0.0, "nll": 0.0, "ece": 0.0}
    assert math.isnan(one.gains["acc"].se)


def test_size_curve_every_subset_and_seeded_sample():
    lps = [_random_logp(i) for i in range(5)]
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(3))
    e = group_ensemble("g", [f"m{i}" for i in range(5)], lps, y)
    assert [p.n_subsets for p in e.curve] == [5, 10, 10, 5, 1] and not any(p.sampled for p in e.curve)
    naive = np.mean([metrics(ensemble_log_probs([lps[i] for i in c]), y).nll for c in itertools.combinations(range(5), 2)])
    assert e.curve[1].ensemble["nll"] == pytest.approx(naive, rel=1e-12)
    assert e.curve[0].gain["acc"] == pytest.approx(0.0, abs=1e-15)
    full_gain = metrics(ensemble_log_probs(lps), y).nll - np.mean([metrics(lp, y).nll for lp in lps])
    assert e.gains["nll"].estimate == pytest.approx(full_gain, rel=1e-12) and e.gains["nll"].estimate < 0
    loo = []
    for i in range(5):
        rest = [lp for j, lp in enumerate(lps) if j != i]
        loo.append(metrics(ensemble_log_probs(rest), y).nll - np.mean([metrics(lp, y).nll for lp in rest]))
    assert e.gains["nll"].se == pytest.approx(math.sqrt(4 / 5 * np.sum((np.array(loo) - np.mean(loo)) ** 2)), rel=1e-10)
    s1 = group_ensemble("g", [f"m{i}" for i in range(5)], lps, y, max_subsets=4, seed=7)
    s2 = group_ensemble("g", [f"m{i}" for i in range(5)], lps, y, max_subsets=4, seed=7)
    assert [p.n_subsets for p in s1.curve] == [4, 4, 4, 4, 1] and s1.curve[1].sampled
    assert [v.members for v in s1.subsets] == [v.members for v in s2.subsets]
    assert len({v.members for v in s1.subsets if v.k == 2}) == 4


def test_compare_gains_difference_and_identical_groups():
    lps = [_random_logp(i) for i in range(6)]
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(4))
    a = group_ensemble("a", ["a0", "a1", "a2"], lps[:3], y)
    b = group_ensemble("b", ["b0", "b1", "b2"], lps[3:], y)
    same = group_ensemble("c", ["c0", "c1", "c2"], lps[:3], y)
    rows = {(r.group, r.metric): r for r in compare_gains({"a": a, "b": b, "c": same}, "a")}
    assert rows[("b", "nll")].diff == pytest.approx(b.gains["nll"].estimate - a.gains["nll"].estimate)
    assert rows[("c", "acc")].diff == 0.0
    se = math.sqrt(a.gains["nll"].se ** 2 + b.gains["nll"].se ** 2)  # independent groups: variances add
    assert rows[("b", "nll")].se == pytest.approx(se, rel=1e-10)


def test_logit_cache_runs_each_model_once_and_restores_its_mode():
    from kdprobe.probes.predictions import LogitCache

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).train()
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    cache = LogitCache(x, y, batch_size=4)
    first = cache.get("m", model)
    again = cache.get("m", lambda: pytest.fail("a cached checkpoint must not be loaded or run again"))
    assert again is first and calls == [4, 4, 2] and cache.forward_passes == 1 and model.training
    with torch.no_grad():
        assert torch.allclose(first.logits, model.eval()(x))  # eval mode: dropout off, deterministic
