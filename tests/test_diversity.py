"""Jacobian-correlation diversity probe: known answers, naive loops, state restoration, results/writers."""
import copy
import csv
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats as sps

from kdprobe import create_model
from kdprobe.probes.diversity_table import DiversitySettings, DiversityTable, ModelScore, summarize_groups
from kdprobe.errors import KdprobeError
from kdprobe.probes.diversity import (
    input_jacobian,
    jacobian_score,
    jacobian_score_details,
    jacobian_scores,
    probe_indices,
    score_from_eigenvalues,
)
from kdprobe.writers.diversity_files import write_diversity_csv, write_diversity_json
from kdprobe.writers.diversity_plot import write_diversity_html

K = 1e-5


def identity_score(n, k=K):
    return -n * (math.log(1 + k) + 1 / (1 + k))


class HalfSquare(nn.Module):
    """f(x) = |x|^2 / 2, one logit: its input gradient is x itself."""

    def forward(self, x):
        return 0.5 * x.flatten(1).pow(2).sum(1, keepdim=True)


class MLP(nn.Module):
    def __init__(self, d=12, h=16, c=3):
        super().__init__()
        self.a, self.b = nn.Linear(d, h), nn.Linear(h, c)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flatten(1))) * F.relu(self.a(x.flatten(1))))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(h.mean((2, 3)))


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
    with torch.no_grad():  # non-trivial running statistics, as in a trained checkpoint
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(7)
    return m


def naive_rows(model, x, output="sum"):
    """Per-sample loop in eval mode: each single input on its own, one backward per needed logit."""
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        logits = model(xi)[0]
        if output == "sum":
            picks = [logits.sum()]
        elif output == "pred":
            picks = [logits[logits.argmax()]]
        else:
            picks = list(logits)
        rows.append(torch.cat([torch.autograd.grad(y, xi, retain_graph=True)[0].flatten() for y in picks]))
    return torch.stack(rows)


def numpy_score(rows, k=K):
    c = np.corrcoef(rows.double().numpy())
    return float(-np.sum(np.log(scipy.linalg.eigvalsh(c) + k) + 1 / (scipy.linalg.eigvalsh(c) + k)))


def test_score_of_identity_correlation():
    assert score_from_eigenvalues(torch.ones(128), K) == pytest.approx(identity_score(128), rel=1e-14)
    assert identity_score(128) == pytest.approx(-128.0, abs=1e-2)


def test_orthogonal_zero_mean_jacobian_rows_give_identity_score():
    h = torch.tensor(scipy.linalg.hadamard(8), dtype=torch.float32)
    x = h[1:6] * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])[:, None]  # zero-mean, orthogonal rows
    x = x.reshape(5, 1, 2, 4)
    assert jacobian_score(HalfSquare(), x) == pytest.approx(identity_score(5), abs=1e-9)


def test_linear_model_known_jacobian_and_collinear_error():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    rows = input_jacobian(lin, x, output="sum")
    assert torch.allclose(rows, lin.weight.sum(0).expand(4, 6), atol=1e-6)
    full = input_jacobian(lin, x, output="full")
    assert torch.allclose(full, lin.weight.reshape(1, -1).expand(4, 18), atol=1e-6)
    with pytest.raises(KdprobeError, match="collinear"):
        jacobian_score(lin, x)


@pytest.mark.parametrize("output", ["sum", "full", "pred"])
def test_mlp_jacobian_matches_per_sample_loop(output):
    torch.manual_seed(1)
    m, x = MLP(), torch.randn(6, 12)
    assert torch.allclose(input_jacobian(m, x, output=output), naive_rows(m, x, output), atol=1e-6)


def test_resnet_batched_backward_equals_per_sample_loop_and_numpy_score():
    m, x = tiny_resnet(), torch.randn(10, 1, 8, 8)
    m.train()
    rows = input_jacobian(m, x, bn="eval")
    ref = naive_rows(copy.deepcopy(m), x)
    assert torch.allclose(rows, ref, atol=1e-5, rtol=1e-4)
    assert jacobian_score(m, x, bn="eval") == pytest.approx(numpy_score(ref), abs=1e-4)
    assert torch.allclose(input_jacobian(m, x[:3], output="full"), naive_rows(copy.deepcopy(m), x[:3], "full"),
                          atol=1e-5, rtol=1e-4)


def test_batch_frozen_uses_batch_statistics_per_sample():
    torch.manual_seed(2)
    m, x = ConvBN(), torch.randn(7, 1, 5, 5)
    ref_model = copy.deepcopy(m)
    with torch.no_grad():  # the batch statistics by hand: biased variance, as BN normalises with
        h = m.conv(x)
        ref_model.bn.running_mean.copy_(h.mean((0, 2, 3)))
        ref_model.bn.running_var.copy_(h.var((0, 2, 3), unbiased=False))
    assert torch.allclose(input_jacobian(m, x, bn="batch-frozen"), naive_rows(ref_model, x), atol=1e-6)


def test_train_mode_equals_original_single_backward():
    m, x = tiny_resnet(3), torch.randn(9, 1, 8, 8)
    orig = copy.deepcopy(m).train()
    xin = x.clone().requires_grad_(True)
    orig(xin).sum().backward()
    assert torch.allclose(input_jacobian(m, x, bn="train"), xin.grad.reshape(9, -1), atol=1e-6)


@pytest.mark.parametrize("bn", ["eval", "batch-frozen", "train"])
@pytest.mark.parametrize("variant,output", [("v1", "sum"), ("v1", "full"), ("v2", "sum")])
def test_model_state_unchanged(bn, variant, output):
    m = tiny_resnet(4)
    m.train()
    m.layer2.eval()  # mixed modes must come back exactly
    m.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = [mod.training for mod in m.modules()]
    flags = [p.requires_grad for p in m.parameters()]
    jacobian_score(m, torch.randn(6, 1, 8, 8), bn=bn, variant=variant, output=output)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # params and buffers, num_batches_tracked too
    assert [mod.training for mod in m.modules()] == modes
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(p.grad is None for p in m.parameters())


class FunctionalRelus(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 4), nn.Linear(4, 3)
        self.act = nn.ReLU()

    def layers(self, x):
        a = F.relu(self.l1(x))
        b = F.relu(self.l2(a))
        c = self.act(self.l3(b))
        d = torch.relu(self.l4(c)).clone().relu_()  # two more spellings, 3 + 3 units
        return [a, b, c, d]

    def forward(self, x):
        return self.layers(x)[-1]


def test_v2_counts_functional_relus_and_matches_hamming_loop():
    torch.manual_seed(5)
    m, x = FunctionalRelus(), torch.randn(6, 5)
    det = jacobian_score_details(m, x, variant="v2")
    assert det.units_seen == 7 + 6 + 4 + 3 + 3 and det.relu_calls == 5
    with torch.no_grad():
        acts = m.layers(x)
        acts.append(acts[-1])  # relu_ of the clone: same code again
        codes = torch.cat([(a > 0).flatten(1) for a in acts], 1).numpy()
    u = codes.shape[1]
    kern = np.array([[u - np.sum(ci != cj) for cj in codes] for ci in codes], dtype=float)
    sign, logdet = np.linalg.slogdet(kern)
    assert sign > 0 and det.score == pytest.approx(logdet, rel=1e-12)


class ClippedRelus(nn.Module):
    """ReLU6 as a module (in place) and functional, a hardtanh clipped at 0, and two that are not ReLUs."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 4), nn.Linear(4, 3)
        self.act = nn.ReLU6(inplace=True)

    def layers(self, x):
        a = self.act(self.l1(x) * 6)  # scaled so some units saturate at 6
        b = F.relu6(self.l2(a))
        c = F.hardtanh(self.l3(b), 0.0, 2.0)
        d = F.leaky_relu(F.hardtanh(self.l4(c)))  # hardtanh(-1, 1) and leaky ReLU: no zero region, not counted
        return [a, b, c], d

    def forward(self, x):
        return self.layers(x)[1]


def test_v2_counts_relu6_and_clipped_relus():
    torch.manual_seed(0)
    m, x = ClippedRelus(), torch.randn(6, 5)
    det = jacobian_score_details(m, x, variant="v2")
    assert det.units_seen == 7 + 6 + 4 and det.relu_calls == 3
    with torch.no_grad():
        acts, _ = m.layers(x)
        codes = torch.cat([(a > 0).flatten(1) for a in acts], 1).numpy()
    assert (acts[0] == 6).any()  # the clip at 6 is reached, and counts as "on"
    u = codes.shape[1]
    kern = np.array([[u - np.sum(ci != cj) for cj in codes] for ci in codes], dtype=float)
    sign, logdet = np.linalg.slogdet(kern)
    assert sign > 0 and det.score == pytest.approx(logdet, rel=1e-12)
    torch.manual_seed(6)  # this draw gives two inputs one code: K is singular, however LU rounds
    with pytest.raises(KdprobeError, match="1 pairs of inputs with identical codes"):
        jacobian_score_details(ClippedRelus(), torch.randn(6, 5), variant="v2")


def test_v2_counts_resnet_units():
    det = jacobian_score_details(tiny_resnet(), torch.randn(4, 1, 8, 8), variant="v2")
    # stem 4x8x8, stage1 block 2x(4x8x8), stage2 2x(8x4x4), stage3 2x(16x2x2)
    assert det.units_seen == 256 + 2 * 256 + 2 * 128 + 2 * 64 and det.relu_calls == 7


def test_duplicate_inputs_raise():
    x = torch.randn(5, 1, 8, 8)
    x[3] = x[1]
    with pytest.raises(KdprobeError, match="1 duplicate inputs"):
        jacobian_score(tiny_resnet(), x)
    with pytest.raises(KdprobeError, match="duplicate"):
        jacobian_score(tiny_resnet(), x, variant="v2")


def test_constant_jacobian_row_and_rank_bound_raise():
    x = torch.randn(4, 1, 2, 3)
    x[2] = -x[2].abs() - 0.1  # relu(x)^2/2 has gradient relu(x) = 0 everywhere for this input
    relu_square = lambda z: 0.5 * F.relu(z.flatten(1)).pow(2).sum(1, keepdim=True)  # noqa: E731

    class M(nn.Module):
        def forward(self, z):
            return relu_square(z)

    with pytest.raises(KdprobeError, match="constant"):
        jacobian_score(M(), x)
    with pytest.raises(KdprobeError, match="at most 5 inputs"):
        jacobian_score(HalfSquare(), torch.randn(6, 1, 2, 3))


def test_no_stale_grad_and_repeatable():
    m, x = tiny_resnet(6), torch.randn(5, 1, 8, 8)
    s1, s2 = jacobian_score(m, x), jacobian_score(m, x)
    assert s1 == s2 and x.grad is None
    xr = x.clone().requires_grad_(True)
    assert jacobian_score(m, xr) == s1 and xr.grad is None
    assert all(p.grad is None for p in m.parameters())


def test_jacobian_scores_and_probe_indices():
    m = tiny_resnet(7)
    data = torch.randn(40, 1, 8, 8)
    idx = probe_indices(40, runs=3, batch_size=8, seed=11)
    assert [i.tolist() for i in idx] == [i.tolist() for i in probe_indices(40, 3, 8, 11)]
    assert all(len(set(i.tolist())) == 8 for i in idx) and idx[0].tolist() != idx[1].tolist()
    vals = jacobian_scores(m, [data[i] for i in idx], bn="eval")
    assert vals == [jacobian_score(m, data[i]) for i in idx]
    with pytest.raises(KdprobeError):
        probe_indices(5, 1, 8)


def _hand_made_scores():
    return [
        ModelScore.from_values("s1.pt", "scratch", 0, [-150.0, -149.0]),
        ModelScore.from_values("s2.pt", "scratch", 1, [-148.0, -148.5]),
        ModelScore.from_values("s3.pt", "scratch", 2, [-151.0, -150.0]),
        ModelScore.from_values("k1.pt", "kd", 0, [-143.0, -144.0]),
        ModelScore.from_values("k2.pt", "kd", 1, [-142.0, -142.5]),
        ModelScore.from_values("k3.pt", "kd", 2, [-145.0, -144.0]),
        ModelScore.from_values("c1.pt", "cutmix", 0, [-147.0, -146.0, -146.5, -148.0]),
    ]


def test_summarize_groups_against_scipy():
    groups = {g.group: g for g in summarize_groups(_hand_made_scores(), reference="scratch", confidence=0.99)}
    assert list(groups) == ["scratch", "kd", "cutmix"]
    scratch, kd, cut = [-149.5, -148.25, -150.5], [-143.5, -142.25, -144.5], [-147.0, -146.0, -146.5, -148.0]
    for g, vals in (("scratch", scratch), ("kd", kd), ("cutmix", cut)):
        lo, hi = sps.t.interval(0.99, len(vals) - 1, loc=np.mean(vals), scale=sps.sem(vals))
        assert (groups[g].low, groups[g].high) == pytest.approx((lo, hi), rel=1e-12)
        assert groups[g].std == pytest.approx(np.std(vals, ddof=1))
    assert groups["cutmix"].uses_batch_values and groups["cutmix"].n_models == 1 and not groups["kd"].uses_batch_values
    p_kd = sps.ttest_ind(kd, scratch, equal_var=False).pvalue
    p_cut = sps.ttest_ind(cut, scratch, equal_var=False).pvalue
    assert groups["kd"].p_value == pytest.approx(p_kd) and groups["cutmix"].p_value == pytest.approx(p_cut)
    assert p_kd < p_cut  # so by hand: Holm multiplies the smaller by 2, the larger by 1 (kept monotone)
    assert groups["kd"].p_holm == pytest.approx(min(1.0, 2 * p_kd))
    assert groups["cutmix"].p_holm == pytest.approx(max(min(1.0, 2 * p_kd), p_cut))
    pooled = math.sqrt((2 * np.var(kd, ddof=1) + 2 * np.var(scratch, ddof=1)) / 4)
    assert groups["kd"].hedges_g == pytest.approx((np.mean(kd) - np.mean(scratch)) / pooled * (1 - 3 / 15))
    assert math.isnan(groups["scratch"].p_value) and math.isnan(groups["scratch"].hedges_g)
    with pytest.raises(KdprobeError, match="reference"):
        summarize_groups(_hand_made_scores(), reference="autoaugment")


def test_writers(tmp_path):
    scores = _hand_made_scores()
    settings = DiversitySettings(batch_size=128, runs=2, split="train", bn="eval", output="sum", variant="v1",
                                 k=K, seed=0, dataset="cifar10")
    groups = summarize_groups(scores, confidence=0.99, interval="normal")
    write_diversity_csv(scores, groups, settings, tmp_path / "d.csv")
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(rows) == sum(len(s.values) for s in scores)
    assert float(rows[1]["score"]) == -149.0 and rows[1]["bn"] == "eval" and rows[1]["probe_seed"] == "0"
    write_diversity_json(scores, groups, settings, tmp_path / "d.json")
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["settings"]["batch_size"] == 128 and doc["data"]["groups"][0]["p_value"] is None
    assert doc["data"]["models"][0]["values"] == [-150.0, -149.0]
    write_diversity_html(DiversityTable(settings, tuple(scores), tuple(groups)), tmp_path / "d.html")
    html = (tmp_path / "d.html").read_text()
    assert "N=128" in html and "bn=eval" in html and "<script src=\"http" not in html
    assert len(html) > 1_000_000  # plotly.js is inlined: the page works offline
