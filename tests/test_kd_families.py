"""KD families (trainers/kd_families.py): each loss against (a) a naive re-computation from the paper's formula
written here with loops and numpy, and (b) the numbers RepDistiller's and mdistiller's own loss code gave on the
same float64 tensors (literals in REF, made by REFERENCE_SCRIPT; this test does not need those codebases).

Tolerance: every comparison is float64. The largest reduction here has about 2,000 terms (RKD's 6^3 angles of
9-d differences), so two summation orders differ by at most 2 gamma_2000 ~ 4.4e-13 of the sum of |terms|
(tests/tolerance.sum_rtol); the elementwise exp/log/sqrt add an ulp each. RTOL = 1e-12 covers that, relative
to the larger of |value| and the sum of |terms| where a value is a difference (directional derivatives); a
wrong weight, sign, mean or normalisation moves these numbers by 1e-3 or more.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from tolerance import sum_rtol
from trainers import kd_families as kf
from trainers.losses import label_kd_loss

pytestmark = pytest.mark.numeric

RTOL = 1e-12
assert RTOL > 2 * sum_rtol(2000, torch.float64)
B = 6


def kd_inputs() -> dict:
    """Fixed float64 arrays for every method (numpy's legacy RandomState: its stream is frozen)."""
    rs = np.random.RandomState(22)
    n = rs.standard_normal
    d = {}
    # AT: pairs of equal size, teacher larger (pooled to the student's), student larger
    d["at_s"] = [n((B, 3, 8, 8)), n((B, 4, 4, 4)), n((B, 5, 4, 4))]
    d["at_t"] = [n((B, 6, 8, 8)), n((B, 7, 8, 8)), n((B, 8, 2, 2))]
    d["at_v"] = [n(a.shape) for a in d["at_s"]]
    # FitNet: the three regressor cases (stride-2 conv, stride-2 transposed conv, (1+Hs-Ht)-kernel conv)
    d["fit"] = []
    for s_shape, t_shape, kind in (((B, 3, 8, 8), (B, 5, 4, 4), "conv_s2"),
                                   ((B, 3, 4, 4), (B, 5, 8, 8), "tconv"),
                                   ((B, 3, 6, 5), (B, 5, 4, 4), "conv_k")):
        cs, ct = s_shape[1], t_shape[1]
        w_shape = {"conv_s2": (ct, cs, 3, 3), "tconv": (cs, ct, 4, 4),
                   "conv_k": (ct, cs, 1 + s_shape[2] - t_shape[2], 1 + s_shape[3] - t_shape[3])}[kind]
        d["fit"].append(dict(kind=kind, fs=n(s_shape), ft=np.maximum(n(t_shape), 0), w=0.3 * n(w_shape),
                             b=0.1 * n(ct), gamma=1 + 0.1 * n(ct), beta=0.1 * n(ct), v=n(s_shape)))
    d["sp_s"], d["sp_t"] = n((B, 4, 4, 4)), n((B, 6, 2, 2))
    d["sp_v"] = n((B, 4, 4, 4))
    # RKD / PKT: pooled features (ReLU outputs, like a penultimate layer)
    d["rkd_s"], d["rkd_t"] = np.maximum(n((B, 7)), 0) + 0.1, np.maximum(n((B, 9)), 0) + 0.1
    d["rkd_v"] = n((B, 7))
    d["pkt_s"], d["pkt_t"], d["pkt_v"] = n((B, 7)), n((B, 9)), n((B, 7))
    # DKD: 10 classes
    d["dkd_s"], d["dkd_t"] = 3 * n((B, 10)), 3 * n((B, 10))
    d["dkd_y"], d["dkd_y2"] = rs.randint(0, 10, B), rs.randint(0, 10, B)
    d["dkd_v"] = n((B, 10))
    # CRD: tiny bank (12 samples, 4-d embeddings), K = 5, batches of 3, two steps (row 2 in both)
    nd, dim, k, bs = 12, 4, 5, 3
    c = dict(n_data=nd, feat_dim=dim, k=k, s_dim=7, t_dim=9)
    stdv = 1 / np.sqrt(dim / 3)
    c["mem_s"], c["mem_t"] = rs.uniform(-stdv, stdv, (nd, dim)), rs.uniform(-stdv, stdv, (nd, dim))
    c["ws"], c["bs"] = 0.4 * n((dim, 7)), 0.1 * n(dim)
    c["wt"], c["bt"] = 0.4 * n((dim, 9)), 0.1 * n(dim)
    c["steps"] = []
    for idx in ([2, 7, 11], [0, 2, 5]):
        idx = np.array(idx)
        neg = rs.randint(0, nd, (bs, k))
        c["steps"].append(dict(fs=np.maximum(n((bs, 7)), 0), ft=np.maximum(n((bs, 9)), 0), index=idx,
                               contrast=np.concatenate([idx[:, None], neg], axis=1), v=n((bs, 7))))
    d["crd"] = c
    return d


D = kd_inputs()


def T(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).clone()


def close(got: float, want: float, scale: float = 0.0, rtol: float = RTOL) -> bool:
    return abs(got - want) <= rtol * max(abs(want), scale)


def value_and_slope(fn, xs, vs) -> tuple[float, float, float]:
    """(fn(xs), sum_i <d fn / d x_i, v_i>, sum of |terms| of that dot product) by autograd."""
    xs = [T(x).requires_grad_(True) for x in xs]
    y = fn(xs)
    gs = torch.autograd.grad(y, xs)
    terms = [g * T(v) for g, v in zip(gs, vs)]
    return y.item(), float(sum(t.sum() for t in terms)), float(sum(t.abs().sum() for t in terms))


# ------------------------------------------------------------------------------------------------------------
# Reference numbers. Made with the two codebases at
#   RepDistiller b84f547c5db6a35318d4671d7d5c4de74c822403, mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259
# (checked out with `git archive HEAD` from the fetched mirrors into /tmp/kdref/rd and /tmp/kdref/md), by
#   .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); from test_kd_families import REFERENCE_SCRIPT as s;
#                        open('/tmp/kdref/ref.py', 'w').write(s)"
#   cd /tmp/kdref && /work/main/.venv/bin/python ref.py rd md /work/main
# which runs their distiller_zoo / crd / mdistiller.distillers code (torch 2.14.1, float64 default dtype) on
# kd_inputs() and prints this dict; every value both codebases compute agreed to the last bit. Each entry:
# (value, directional derivative <d value / d student input, v>) unless noted.
REF = {
    'at': (0.10801950661037987, -0.0694987712468409),
    'fitnet0': (0.6636422450966477, 0.004114688002722837),
    'fitnet1': (0.7475691708221001, 0.01273111474494967),
    'fitnet2': (0.73366796981844, -0.0330401741950595),
    'sp': (0.047277647644412085, 0.0018220859212004772),
    'rkd': (3.5925654006091827, -0.29948185170878494),
    'rkd_distance': (0.0649460813117853, 0.002918731558043206),
    'rkd_angle': (0.03937826735629101, -0.007449002813197296),
    'pkt': (0.012072349687371189, 0.021782771901126218),
    'dkd': (79.29281355602416, 3.8208981725457614),
    'dkd_tckd': (1.1968482520085009, 0.18312511122664143),
    'dkd_nckd': (9.761995663001956, 0.45472163266489013),
    # (CE, warmed-up DKD term) of mdistiller's DKD distiller at these epochs (counted from 1)
    'dkd_epoch1': (4.311017401190391, 3.964640677801208),
    'dkd_epoch3': (4.311017401190391, 11.893922033403623),
    'dkd_epoch20': (4.311017401190391, 79.29281355602416),
    'dkd_epoch25': (4.311017401190391, 79.29281355602416),
    # CRD, two steps on one bank: (loss, slope); (Z_s, Z_t); (student bank, teacher bank) rows 0, 2, 5, 7, 11
    'crd_step0': (29.59042491872161, 2.3041790501157786),
    'crd_z0': (945020.5232918481, 12724213.140125278),
    'crd_mem0': (
        [
            [0.3480605610988453, -0.4037818774488413, 0.7945633220987179, -0.2584618448776044],
            [-0.23911100028765764, -0.47229995593026036, 0.1481071330057039, -0.8353579821385204],
            [0.06382769706960834, 0.2826110576697113, -0.6102542418692547, 0.7377916833131509],
            [0.32348983941073817, 0.8435417151610779, -0.34235998632012465, 0.258033599261813],
            [0.9659235999213658, 0.16394098711338906, 0.13403920043623496, -0.14882353512012741],
        ],
        [
            [0.03775819227909727, -0.2570990606661142, 0.31587201898270456, 0.23283934100976655],
            [0.24706065278398204, 0.9198695114763203, 0.12742958541582758, 0.27669986711781913],
            [-0.3191785419653833, 0.809602338653829, -0.48035954631784505, 0.8257536077377846],
            [0.2781040999828356, 0.18187992196991287, -0.39272780255243744, -0.8575212397715226],
            [-0.17129552842468382, -0.6863468173062052, 0.22514392874601183, -0.6699970892952907],
        ],
    ),
    'crd_step1': (30.411237273812496, 2.508099621248375),
    'crd_z1': (945020.5232918481, 12724213.140125278),
    'crd_mem1': (
        [
            [0.3821470486767909, 0.2952661688606961, 0.456859643123081, -0.7470346639878208],
            [-0.33748872285784404, 0.050997483276027544, -0.08171568734022189, -0.9363883623186524],
            [0.21315894588682552, 0.8117437293268095, -0.5331327068663533, 0.10679371964856187],
            [0.32348983941073817, 0.8435417151610779, -0.34235998632012465, 0.258033599261813],
            [0.9659235999213658, 0.16394098711338906, 0.13403920043623496, -0.14882353512012741],
        ],
        [
            [0.3993236726843579, -0.6544786914180539, 0.5099166440153576, -0.3901067329202388],
            [0.650301891287479, 0.71547338346782, 0.2173863410643832, 0.1339718868109177],
            [0.17887453853379295, 0.44188388092750835, -0.6340991901138752, 0.6088191458369997],
            [0.2781040999828356, 0.18187992196991287, -0.39272780255243744, -0.8575212397715226],
            [-0.17129552842468382, -0.6863468173062052, 0.22514392874601183, -0.6699970892952907],
        ],
    ),
}
CRD_ROWS = [0, 2, 5, 7, 11]

REFERENCE_SCRIPT = r'''
"""Reference values for tests/test_kd_families.py from RepDistiller and mdistiller's own loss code.

usage: python ref.py REPDISTILLER_DIR MDISTILLER_DIR KDPROBE_REPO  (float64 throughout; kdprobe gives only the inputs)"""
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

rd_dir, md_dir, repo = sys.argv[1:4]
sys.path[:0] = [rd_dir, md_dir, repo, repo + "/tests"]
torch.set_default_dtype(torch.float64)  # the references' params buffers and heads in float64 too
from test_kd_families import kd_inputs  # noqa: E402

import crd.criterion as rd_crd  # noqa: E402
import crd.memory as rd_mem  # noqa: E402
from distiller_zoo import PKT, Attention, HintLoss, RKDLoss, Similarity  # noqa: E402
from models.util import ConvReg as RdConvReg  # noqa: E402
import mdistiller.distillers  # noqa: E402
md_crd = sys.modules["mdistiller.distillers.CRD"]
from mdistiller.distillers.AT import at_loss as md_at  # noqa: E402
from mdistiller.distillers.DKD import DKD as MdDKD, dkd_loss as md_dkd  # noqa: E402
from mdistiller.distillers.PKT import pkt_loss as md_pkt  # noqa: E402
from mdistiller.distillers.RKD import rkd_loss as md_rkd  # noqa: E402
from mdistiller.distillers.SP import sp_loss as md_sp  # noqa: E402
from mdistiller.distillers._common import ConvReg as MdConvReg  # noqa: E402

rd_mem.AliasMethod.cuda = lambda self: None  # CPU run: the alias sampler is unused (contrast indices given)
md_crd.AliasMethod.cuda = lambda self: None
T = torch.from_numpy
D = kd_inputs()
out = {}


def val_grad(fn, xs, vs):
    """(value, sum_i <d value / d x_i, v_i>) of fn on leaf copies of xs."""
    xs = [T(x).clone().requires_grad_(True) for x in xs]
    y = fn(xs)
    y = y.sum() if y.dim() else y
    gs = torch.autograd.grad(y, xs)
    return y.item(), sum(float((g * T(v)).sum()) for g, v in zip(gs, vs))


gt = [T(a) for a in D["at_t"]]
out["at_rd"] = val_grad(lambda s: sum(Attention()(s, gt)), D["at_s"], D["at_v"])
out["at_md"] = val_grad(lambda s: md_at(s, gt, 2), D["at_s"], D["at_v"])

for i, f in enumerate(D["fit"]):
    for tag, cls in (("rd", RdConvReg), ("md", MdConvReg)):
        reg = cls(f["fs"].shape, f["ft"].shape)
        with torch.no_grad():
            reg.conv.weight.copy_(T(f["w"])); reg.conv.bias.copy_(T(f["b"]))
            reg.bn.weight.copy_(T(f["gamma"])); reg.bn.bias.copy_(T(f["beta"]))
        reg.train()
        crit = HintLoss() if tag == "rd" else (lambda a, b: F.mse_loss(a, b))
        out[f"fitnet{i}_{tag}"] = val_grad(lambda s: crit(reg(s[0]), T(f["ft"])), [f["fs"]], [f["v"]])

out["sp_rd"] = val_grad(lambda s: sum(Similarity()(s, [T(D["sp_t"])])), [D["sp_s"]], [D["sp_v"]])
out["sp_md"] = val_grad(lambda s: md_sp(s, [T(D["sp_t"])]), [D["sp_s"]], [D["sp_v"]])

for wd, wa, tag in ((25, 50, ""), (1, 0, "_distance"), (0, 1, "_angle")):
    out[f"rkd{tag}_rd"] = val_grad(lambda s: RKDLoss(wd, wa)(s[0], T(D["rkd_t"])), [D["rkd_s"]], [D["rkd_v"]])
    out[f"rkd{tag}_md"] = val_grad(lambda s: md_rkd(s[0], T(D["rkd_t"]), False, 1e-12, wd, wa),
                                   [D["rkd_s"]], [D["rkd_v"]])

out["pkt_rd"] = val_grad(lambda s: PKT()(s[0], T(D["pkt_t"])), [D["pkt_s"]], [D["pkt_v"]])
out["pkt_md"] = val_grad(lambda s: md_pkt(s[0], T(D["pkt_t"])), [D["pkt_s"]], [D["pkt_v"]])

y = T(D["dkd_y"]).long()
for a, b, tag in ((1.0, 8.0, ""), (1.0, 0.0, "_tckd"), (0.0, 1.0, "_nckd")):
    out[f"dkd{tag}_md"] = val_grad(lambda s: md_dkd(s[0], T(D["dkd_t"]), y, a, b, 4.0), [D["dkd_s"]], [D["dkd_v"]])


class Fixed(torch.nn.Module):  # a "model" that returns given logits (mdistiller's DKD distiller calls its models)
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, image):
        return self.logits, {}


cfg = types.SimpleNamespace(DKD=types.SimpleNamespace(CE_WEIGHT=1.0, ALPHA=1.0, BETA=8.0, T=4.0, WARMUP=20))
dkd = MdDKD(Fixed(T(D["dkd_s"])), Fixed(T(D["dkd_t"])), cfg)
for epoch in (1, 3, 20, 25):
    _, losses = dkd.forward_train(image=None, target=y, epoch=epoch)
    out[f"dkd_epoch{epoch}_md"] = (losses["loss_ce"].item(), losses["loss_kd"].item())


def crd_run(tag):
    c = D["crd"]
    opt = types.SimpleNamespace(s_dim=c["s_dim"], t_dim=c["t_dim"], feat_dim=c["feat_dim"], n_data=c["n_data"],
                                nce_k=c["k"], nce_t=0.07, nce_m=0.5)
    if tag == "rd":
        m = rd_crd.CRDLoss(opt)
        loss_fn = m
    else:
        m = md_crd.CRD(torch.nn.Identity(), torch.nn.Identity(), types.SimpleNamespace(CRD=types.SimpleNamespace(
            LOSS=types.SimpleNamespace(CE_WEIGHT=1.0, FEAT_WEIGHT=0.8), FEAT=types.SimpleNamespace(
                STUDENT_DIM=c["s_dim"], TEACHER_DIM=c["t_dim"], DIM=c["feat_dim"]),
            NCE=types.SimpleNamespace(K=c["k"], MOMENTUM=0.5, TEMPERATURE=0.07))), c["n_data"])
        loss_fn = m.crd_loss
    embed_s, embed_t, memory = m.embed_s, m.embed_t, m.contrast
    with torch.no_grad():
        embed_s.linear.weight.copy_(T(c["ws"])); embed_s.linear.bias.copy_(T(c["bs"]))
        embed_t.linear.weight.copy_(T(c["wt"])); embed_t.linear.bias.copy_(T(c["bt"]))
        memory.memory_v1.copy_(T(c["mem_s"])); memory.memory_v2.copy_(T(c["mem_t"]))
    rows = sorted(set(c["steps"][0]["index"]) | set(c["steps"][1]["index"]))
    for i, st in enumerate(c["steps"]):
        fs = T(st["fs"]).clone().requires_grad_(True)
        loss = loss_fn(fs, T(st["ft"]), T(st["index"]).long(), T(st["contrast"]).long()).sum()
        (g,) = torch.autograd.grad(loss, fs)
        out[f"crd_step{i}_{tag}"] = (loss.item(), float((g * T(st["v"])).sum()))
        out[f"crd_z{i}_{tag}"] = (memory.params[2].item(), memory.params[3].item())
        out[f"crd_mem{i}_{tag}"] = (memory.memory_v1[rows].tolist(), memory.memory_v2[rows].tolist())


crd_run("rd")
crd_run("md")
ref = {}
for key, v in out.items():
    name, tag = key.rsplit("_", 1)
    if name in ref:  # both codebases ran it: they must agree to the last bit
        assert ref[name] == v, (key, ref[name], v)
    ref[name] = v
print("mdistiller agrees with RepDistiller on every shared value")
print("REF = {")
for name, v in ref.items():
    print(f"    {name!r}: {v!r},")
print("}")
'''


# ------------------------------------------------------------------------------------------------------------
# naive re-computations from the papers' formulas (numpy, loops)
def np_pool(f, h, w):
    """Adaptive average pooling where the sizes divide: block means."""
    n, c, hh, ww = f.shape
    return f.reshape(n, c, h, hh // h, w, ww // w).mean(axis=(3, 5))


def naive_at(g_s, g_t, p=2):
    total = 0.0
    for s, t in zip(g_s, g_t):
        h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
        s, t = np_pool(s, h, w), np_pool(t, h, w)
        acc = 0.0
        for i in range(s.shape[0]):
            a_s = np.array([sum(s[i, c, y, x] ** p for c in range(s.shape[1])) / s.shape[1]
                            for y in range(h) for x in range(w)])
            a_t = np.array([sum(t[i, c, y, x] ** p for c in range(t.shape[1])) / t.shape[1]
                            for y in range(h) for x in range(w)])
            a_s, a_t = a_s / math.sqrt((a_s ** 2).sum()), a_t / math.sqrt((a_t ** 2).sum())
            acc += ((a_s - a_t) ** 2).sum()
        total += acc / (s.shape[0] * h * w)
    return total


def np_conv(x, w, b, stride, pad):
    n, c, h, ww = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (ww + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(n):
        for k in range(o):
            for y in range(oh):
                for z in range(ow):
                    patch = xp[i, :, y * stride:y * stride + kh, z * stride:z * stride + kw]
                    out[i, k, y, z] = (patch * w[k]).sum() + b[k]
    return out


def np_conv_transpose(x, w, b, stride, pad):
    """Each input pixel scatters w[c_in] * x into the output at (stride * y - pad + ky, stride * x - pad + kx)."""
    n, c, h, ww = x.shape
    _, o, kh, kw = w.shape
    oh, ow = (h - 1) * stride - 2 * pad + kh, (ww - 1) * stride - 2 * pad + kw
    out = np.zeros((n, o, oh, ow)) + b[None, :, None, None]
    for i in range(n):
        for ci in range(c):
            for y in range(h):
                for z in range(ww):
                    for ky in range(kh):
                        for kx in range(kw):
                            yy, zz = stride * y - pad + ky, stride * z - pad + kx
                            if 0 <= yy < oh and 0 <= zz < ow:
                                out[i, :, yy, zz] += w[ci, :, ky, kx] * x[i, ci, y, z]
    return out


def naive_fitnet(f):
    x = f["fs"]
    if f["kind"] == "conv_s2":
        y = np_conv(x, f["w"], f["b"], 2, 1)
    elif f["kind"] == "tconv":
        y = np_conv_transpose(x, f["w"], f["b"], 2, 1)
    else:
        y = np_conv(x, f["w"], f["b"], 1, 0)
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = ((y - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)  # BN in training: biased batch variance
    y = (y - mean) / np.sqrt(var + 1e-5) * f["gamma"][None, :, None, None] + f["beta"][None, :, None, None]
    y = np.maximum(y, 0)
    return ((y - f["ft"]) ** 2).mean()


def naive_sp(fs, ft):
    def rows(f):
        f = f.reshape(f.shape[0], -1)
        g = np.array([[float(np.dot(f[i], f[j])) for j in range(len(f))] for i in range(len(f))])
        return g / np.sqrt((g ** 2).sum(axis=1, keepdims=True))
    b = fs.shape[0]
    return ((rows(ft) - rows(fs)) ** 2).sum() / (b * b)


def smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def naive_rkd(fs, ft, eps=1e-12):
    b = len(fs)

    def geometry(e):
        d = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if i != j:
                    d[i, j] = math.sqrt(max(sum((e[j] - e[i]) ** 2), eps))
        d = d / (d.sum() / (b * b - b))
        ang = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u, w = e[j] - e[i], e[k] - e[i]
                    nu, nw = np.linalg.norm(u), np.linalg.norm(w)
                    if nu > 0 and nw > 0:
                        ang[i, j, k] = np.dot(u, w) / (nu * nw)
        return d, ang
    ds, as_ = geometry(fs)
    dt, at = geometry(ft)
    dist = sum(smooth_l1(ds[i, j] - dt[i, j]) for i in range(b) for j in range(b)) / b ** 2
    ang = sum(smooth_l1(as_[i, j, k] - at[i, j, k]) for i in range(b) for j in range(b) for k in range(b)) / b ** 3
    return dist, ang


def naive_pkt(fs, ft, eps=1e-7):
    def density(f):
        u = f / (np.sqrt((f ** 2).sum(axis=1, keepdims=True)) + eps)
        k = np.array([[(np.dot(u[i], u[j]) + 1) / 2 for j in range(len(u))] for i in range(len(u))])
        return k / k.sum(axis=1, keepdims=True)
    ps, pt = density(fs), density(ft)
    b = len(fs)
    return sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for i in range(b) for j in range(b)) / b ** 2


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def naive_dkd(ls, lt, y, temperature=4.0):
    """(TCKD, NCKD), each T^2 * batch mean: binary [p_gt, 1 - p_gt] KL and the KL of p over the other classes
    renormalised (p_j / (1 - p_gt)), which is the softmax of the other logits."""
    tckd = nckd = 0.0
    for s, t, c in zip(ls, lt, y):
        ps, pt = softmax(s / temperature), softmax(t / temperature)
        others = [j for j in range(len(s)) if j != c]
        bs = [ps[c], sum(ps[j] for j in others)]
        bt = [pt[c], sum(pt[j] for j in others)]
        tckd += sum(bt[i] * math.log(bt[i] / bs[i]) for i in range(2))
        qs, qt = [ps[j] / bs[1] for j in others], [pt[j] / bt[1] for j in others]
        nckd += sum(b * math.log(b / a) for a, b in zip(qs, qt))
    n = len(ls)
    return tckd / n * temperature ** 2, nckd / n * temperature ** 2


def naive_crd(c, temperature=0.07, momentum=0.5, eps=1e-7):
    """Both steps of CRD by hand: [(loss, z_s, z_t)], final (student bank, teacher bank)."""
    mem_s, mem_t = c["mem_s"].copy(), c["mem_t"].copy()
    z_s = z_t = None
    nd, k = c["n_data"], c["k"]
    out = []
    for st in c["steps"]:
        def embed(w, b, f):
            v = f @ w.T + b
            return v / np.sqrt((v ** 2).sum(axis=1, keepdims=True))
        v_s, v_t = embed(c["ws"], c["bs"], st["fs"]), embed(c["wt"], c["bt"], st["ft"])
        bs = len(v_s)
        e_s = np.array([[math.exp(np.dot(mem_t[j], v_s[i]) / temperature) for j in st["contrast"][i]] for i in range(bs)])
        e_t = np.array([[math.exp(np.dot(mem_s[j], v_t[i]) / temperature) for j in st["contrast"][i]] for i in range(bs)])
        if z_s is None:
            z_s, z_t = e_s.mean() * nd, e_t.mean() * nd
        loss = 0.0
        for p in (e_s / z_s, e_t / z_t):
            kpn = k / nd
            loss -= (sum(math.log(p[i, 0] / (p[i, 0] + kpn + eps)) for i in range(bs))
                     + sum(math.log(kpn / (p[i, j] + kpn + eps)) for i in range(bs) for j in range(1, k + 1))) / bs
        for mem, v in ((mem_s, v_s), (mem_t, v_t)):
            for i, row in enumerate(st["index"]):
                r = momentum * mem[row] + (1 - momentum) * v[i]
                mem[row] = r / np.linalg.norm(r)
        out.append((loss, z_s, z_t, mem_s.copy(), mem_t.copy()))
    return out


# ------------------------------------------------------------------------------------------------------------
# AT
def test_at_equals_the_formula_and_the_references():
    got, slope, scale = value_and_slope(lambda s: kf.at_loss(s, [T(a) for a in D["at_t"]]), D["at_s"], D["at_v"])
    assert close(got, naive_at(D["at_s"], D["at_t"]))
    assert close(got, REF["at"][0]) and close(slope, REF["at"][1], scale)


def test_at_pools_the_larger_map_and_pairs_one_to_one():
    s, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    assert torch.equal(kf.at_loss([s], [t]), kf.at_loss([F.adaptive_avg_pool2d(s, 4)], [t]))
    with pytest.raises(KdprobeError, match="one to one"):
        kf.at_loss([s, s], [t])
    with pytest.raises(KdprobeError, match="N, C, H, W"):
        kf.at_loss([s.flatten(1)], [t])


# FitNet
def _regressor(f) -> kf.HintRegressor:
    reg = kf.HintRegressor(f["fs"].shape, f["ft"].shape).double()
    with torch.no_grad():
        reg.conv.weight.copy_(T(f["w"]))
        reg.conv.bias.copy_(T(f["b"]))
        reg.bn.weight.copy_(T(f["gamma"]))
        reg.bn.bias.copy_(T(f["beta"]))
    return reg.train()


@pytest.mark.parametrize("i", range(3))
def test_fitnet_hint_equals_the_formula_and_the_references(i):
    f = D["fit"][i]
    reg = _regressor(f)
    assert isinstance(reg.conv, torch.nn.ConvTranspose2d) == (f["kind"] == "tconv")
    assert reg.conv.stride == ((2, 2) if i < 2 else (1, 1))
    got, slope, scale = value_and_slope(lambda s: kf.hint_loss(reg(s[0]), T(f["ft"])), [f["fs"]], [f["v"]])
    assert close(got, naive_fitnet(f))
    assert close(got, REF[f"fitnet{i}"][0]) and close(slope, REF[f"fitnet{i}"][1], scale)


def test_fitnet_regressor_refuses_to_grow_more_than_twice():
    with pytest.raises(KdprobeError, match="cannot grow"):
        kf.HintRegressor((3, 2, 2), (5, 8, 8))
    with pytest.raises(KdprobeError, match="regressed"):
        kf.hint_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


# SP
def test_sp_equals_the_formula_and_the_references():
    got, slope, scale = value_and_slope(lambda s: kf.sp_loss(s, [T(D["sp_t"])]), [D["sp_s"]], [D["sp_v"]])
    assert close(got, naive_sp(D["sp_s"], D["sp_t"]))
    assert close(got, REF["sp"][0]) and close(slope, REF["sp"][1], scale)


# RKD
def test_rkd_equals_the_formula_and_the_references():
    t = T(D["rkd_t"])
    dist, ang = naive_rkd(D["rkd_s"], D["rkd_t"])
    for part, want, weights in (("loss", 25 * dist + 50 * ang, (25, 50)), ("distance", dist, (1, 0)),
                                ("angle", ang, (0, 1))):
        got, slope, scale = value_and_slope(lambda s: kf.rkd_loss(s[0], t, *weights)["loss"], [D["rkd_s"]],
                                            [D["rkd_v"]])
        key = "rkd" if part == "loss" else f"rkd_{part}"
        assert close(got, want), part
        assert close(got, REF[key][0]) and close(slope, REF[key][1], scale), part
    parts = kf.rkd_loss(T(D["rkd_s"]), t)
    assert close(parts["distance"].item(), dist) and close(parts["angle"].item(), ang)


def test_rkd_duplicate_samples_and_zero_eps_keep_finite_gradients():
    e = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64)
    for eps in (1e-12, 0.0):
        (g,) = torch.autograd.grad(kf.rkd_loss(e, t, eps=eps)["loss"], e)
        assert torch.isfinite(g).all(), eps


# PKT
def test_pkt_equals_the_formula_and_the_references():
    got, slope, scale = value_and_slope(lambda s: kf.pkt_loss(s[0], T(D["pkt_t"])), [D["pkt_s"]], [D["pkt_v"]])
    assert close(got, naive_pkt(D["pkt_s"], D["pkt_t"]))
    assert close(got, REF["pkt"][0]) and close(slope, REF["pkt"][1], scale)


# DKD
def test_dkd_equals_the_formula_and_the_references():
    y, t = T(D["dkd_y"]), T(D["dkd_t"])
    tckd, nckd = naive_dkd(D["dkd_s"], D["dkd_t"], D["dkd_y"])
    for key, want, (a, b) in (("dkd", tckd + 8 * nckd, (1.0, 8.0)), ("dkd_tckd", tckd, (1.0, 0.0)),
                              ("dkd_nckd", nckd, (0.0, 1.0))):
        got, slope, scale = value_and_slope(lambda s: kf.dkd_loss(s[0], t, y, a, b, 4.0)["loss"], [D["dkd_s"]],
                                            [D["dkd_v"]])
        assert close(got, want), key
        assert close(got, REF[key][0]) and close(slope, REF[key][1], scale), key


def test_dkd_parts_recombine_into_label_kd():
    """Per sample, KL(p_t || p_s) = TCKD + (1 - p_t^teacher[gt]) NCKD (the DKD paper's eq. 5)."""
    s, t, y = T(D["dkd_s"]), T(D["dkd_t"]), T(D["dkd_y"])
    for i in range(B):
        parts = kf.dkd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1])
        p_gt = F.softmax(t[i] / 4.0, dim=0)[y[i]]
        kd = label_kd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], alpha=1.0, temperature=4.0)["kd"]
        assert close((parts["tckd"] + (1 - p_gt) * parts["nckd"]).item(), kd.item())


def test_dkd_warmup_and_the_method_match_mdistiller():
    y = T(D["dkd_y"])
    m = kf.build("dkd").double()
    for epoch in (1, 3, 20, 25):
        out = m(kf.KDBatch(T(D["dkd_s"]), T(D["dkd_t"]), y, epoch=epoch))
        ce, kd = REF[f"dkd_epoch{epoch}"]
        assert close(out["ce"].item(), ce) and close(out["kd"].item(), kd), epoch
        assert close(out["loss"].item(), ce + kd)
    assert kf.dkd_warmup(1) == 1 / 20 and kf.dkd_warmup(40) == 1.0 and kf.dkd_warmup(0, warmup=0) == 1.0
    with pytest.raises(KdprobeError, match="epoch"):
        m(kf.KDBatch(T(D["dkd_s"]), T(D["dkd_t"]), y))


def test_dkd_under_cutmix_mixes_the_two_targets():
    s, t, ya, yb = T(D["dkd_s"]), T(D["dkd_t"]), T(D["dkd_y"]), T(D["dkd_y2"])
    m = kf.build("dkd", warmup=0).double()
    lam = 0.3
    out = m(kf.KDBatch(s, t, ya, yb, lam))
    ta, na = naive_dkd(D["dkd_s"], D["dkd_t"], D["dkd_y"])
    tb, nb = naive_dkd(D["dkd_s"], D["dkd_t"], D["dkd_y2"])
    assert close(out["kd_raw"].item(), lam * (ta + 8 * na) + (1 - lam) * (tb + 8 * nb))
    ce = lam * F.cross_entropy(s, ya) + (1 - lam) * F.cross_entropy(s, yb)
    assert close(out["ce"].item(), ce.item())
    same = m(kf.KDBatch(s, t, ya, ya.clone(), torch.tensor(lam, dtype=torch.float64)))  # lam as a tensor
    assert close(same["kd_raw"].item(), ta + 8 * na)


# CRD
def _crd_method(c) -> kf.CRDMethod:
    m = kf.build("crd", [(c["s_dim"],)], [(c["t_dim"],)], n_data=c["n_data"], feat_dim=c["feat_dim"], k=c["k"])
    m = m.double()
    with torch.no_grad():
        m.crd.embed_s.linear.weight.copy_(T(c["ws"]))
        m.crd.embed_s.linear.bias.copy_(T(c["bs"]))
        m.crd.embed_t.linear.weight.copy_(T(c["wt"]))
        m.crd.embed_t.linear.bias.copy_(T(c["bt"]))
        m.crd.memory.memory_s.copy_(T(c["mem_s"]))
        m.crd.memory.memory_t.copy_(T(c["mem_t"]))
    return m


def test_crd_loss_bank_and_z_equal_the_formula_and_the_references():
    c = D["crd"]
    m = _crd_method(c)
    naive = naive_crd(c)
    for i, st in enumerate(c["steps"]):
        got, slope, scale = value_and_slope(
            lambda s: m.term(kf.KDBatch(None, None, None, student_feats=[s[0]], teacher_feats=[T(st["ft"])],
                                        index=T(st["index"]), contrast_index=T(st["contrast"])))["loss"],
            [st["fs"]], [st["v"]])
        loss, z_s, z_t, bank_s, bank_t = naive[i]
        assert close(got, loss) and close(got, REF[f"crd_step{i}"][0]), i
        assert close(slope, REF[f"crd_step{i}"][1], scale), i
        mem = m.crd.memory
        assert close(mem.z_s.item(), z_s) and close(mem.z_t.item(), z_t)
        assert close(mem.z_s.item(), REF[f"crd_z{i}"][0]) and close(mem.z_t.item(), REF[f"crd_z{i}"][1])
        for got_bank, naive_bank, ref_bank in ((mem.memory_s, bank_s, REF[f"crd_mem{i}"][0]),
                                               (mem.memory_t, bank_t, REF[f"crd_mem{i}"][1])):
            assert torch.allclose(got_bank, T(naive_bank), rtol=0, atol=RTOL)  # unit rows: absolute = relative
            assert torch.allclose(got_bank[CRD_ROWS], torch.tensor(ref_bank, dtype=torch.float64), rtol=0, atol=RTOL)


def test_crd_memory_momentum_update_by_hand():
    mem = kf.CRDMemory(dim=3, n_data=5, k=2, momentum=0.25, generator=torch.Generator().manual_seed(0)).double()
    before = mem.memory_s.clone(), mem.memory_t.clone()
    v_s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    v_t = torch.tensor([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]], dtype=torch.float64)
    mem.update(v_s, v_t, torch.tensor([4, 1]))
    for bank, old, v in ((mem.memory_s, before[0], v_s.detach()), (mem.memory_t, before[1], v_t)):
        for row, j in ((4, 0), (1, 1)):
            r = [0.25 * old[row, d].item() + 0.75 * v[j, d].item() for d in range(3)]
            norm = math.sqrt(sum(x * x for x in r))
            assert all(close(bank[row, d].item(), r[d] / norm) for d in range(3))
        for row in (0, 2, 3):
            assert torch.equal(bank[row], old[row])
    assert not mem.memory_s.requires_grad
    bound = 1 / math.sqrt(3 / 3)
    assert before[0].abs().max() <= bound and before[0].std() > 0.3  # U(-1, 1) for dim 3


def test_crd_z_is_set_once_and_saved():
    c = D["crd"]
    m = _crd_method(c)
    st = c["steps"][0]
    batch = kf.KDBatch(None, None, None, student_feats=[T(st["fs"])], teacher_feats=[T(st["ft"])],
                       index=T(st["index"]), contrast_index=T(st["contrast"]))
    assert m.crd.memory.z_s.item() < 0
    m.term(batch)
    z = m.crd.memory.z_s.item()
    m.term(batch)
    assert m.crd.memory.z_s.item() == z
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert {"crd.memory.memory_s", "crd.memory.memory_t", "crd.memory.z_s", "crd.memory.z_t"} <= set(state)
    assert state["crd.memory.z_s"].item() == z
    fresh = _crd_method(c)  # a resumed run: the saved Z and bank, not a new Z from its first batch
    fresh.load_state_dict(state)
    assert torch.equal(fresh.term(batch)["loss"], m.term(batch)["loss"])
    assert fresh.crd.memory.z_s.item() == z
    unset = {**state, "crd.memory.z_s": torch.tensor(-1.0, dtype=torch.float64),
             "crd.memory.z_t": torch.tensor(-1.0, dtype=torch.float64)}
    fresh.load_state_dict(unset)  # a state without Z (the moved bank): Z is set again, from this batch
    fresh.term(batch)
    assert fresh.crd.memory.z_s.item() > 0 and fresh.crd.memory.z_s.item() != z


def test_crd_gradcheck_of_scores_and_nce():
    g = torch.Generator().manual_seed(3)
    mem = kf.CRDMemory(dim=4, n_data=9, k=3, generator=g).double()
    emb = kf.CRDEmbed(5, 4).double()
    idx = torch.tensor([[1, 4, 6, 8], [2, 0, 3, 5]])
    x = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    v_t = F.normalize(torch.randn(2, 4, dtype=torch.float64, generator=g), dim=1)
    mem.scores(emb(x), v_t, idx)  # fixes Z, as the first step does

    def f(x):
        out_s, out_t = mem.scores(emb(x), v_t, idx)
        return kf.nce_loss(out_s, 9) + kf.nce_loss(out_t, 9)
    assert torch.autograd.gradcheck(f, (x,))


def test_contrast_sampler_draws_the_positive_and_other_class_negatives():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 3, 5])
    out = kf.ContrastSampler(labels, k=4).draw(index, g)
    assert out.shape == (3, 5) and torch.equal(out[:, 0], index)
    assert (labels[out[:, 1:]] != labels[index][:, None]).all()
    assert all(len(set(r.tolist())) == 4 for r in out[:, 1:])  # 6+ candidates: without replacement
    many = kf.ContrastSampler(labels, k=9).draw(index, g)  # 7 candidates for class 0 rows: with replacement
    assert (labels[many[:, 1:]] != labels[index][:, None]).all()
    relax = kf.ContrastSampler(labels, k=2, mode="relax").draw(index, g)
    assert torch.equal(labels[relax[:, 0]], labels[index])


# ------------------------------------------------------------------------------------------------------------
# gradients of the smooth losses against finite differences (no custom backward anywhere: autograd's own)
def test_gradcheck_of_the_feature_losses():
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    t4, t2 = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=g), torch.randn(3, 5, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 2, 1])
    assert torch.autograd.gradcheck(lambda s: kf.at_loss([s], [t4]), (r(3, 3, 4, 4),))
    assert torch.autograd.gradcheck(lambda s: kf.sp_loss([s], [t4]), (r(3, 3, 2, 2),))
    assert torch.autograd.gradcheck(lambda s: kf.rkd_loss(s, t2)["loss"], (r(3, 4),))
    assert torch.autograd.gradcheck(lambda s: kf.pkt_loss(s, t2), (r(3, 4),))
    assert torch.autograd.gradcheck(lambda s: kf.dkd_loss(s, t2, y)["loss"], (r(3, 5),))


# ------------------------------------------------------------------------------------------------------------
# methods: CE + weight * term, the registry's defaults, what each needs
def test_registry_defaults_are_the_references():
    want = {"at": {"weight": 1000.0, "p": 2.0}, "fitnet": {"weight": 100.0}, "sp": {"weight": 3000.0},
            "rkd": {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0},
            "pkt": {"weight": 30000.0}, "crd": {"weight": 0.8, "feat_dim": 128, "k": 16384, "temperature": 0.07,
                                               "momentum": 0.5},
            "dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20.0}}
    assert set(kf.METHODS) == set(want)
    for name, d in want.items():
        spec = kf.METHODS[name]
        assert {k: spec.defaults[k] for k in d} == d, name
        assert spec.defaults["ce_weight"] == 1.0 and spec.defaults["kd_alpha"] == 0.0, name
    assert [n for n, s in kf.METHODS.items() if s.trainable] == ["fitnet", "crd"]
    assert [n for n, s in kf.METHODS.items() if s.needs_index] == ["crd"]
    assert [n for n, s in kf.METHODS.items() if s.needs_epoch] == ["dkd"]
    assert kf.METHODS["fitnet"].pretrain.epochs == 0  # one stage, as both references
    assert {s.layers for s in kf.METHODS.values()} == {"stages", "hint", "last_map", "penultimate", None}
    with pytest.raises(KdprobeError, match="no setting"):
        kf.build("at", alpha=1.0)
    with pytest.raises(KdprobeError, match="KD method"):
        kf.build("vid")
    with pytest.raises(KdprobeError, match="feature shapes"):
        kf.build("fitnet")


def test_every_method_is_ce_plus_weighted_term_and_leaves_the_teacher_alone():
    g = torch.Generator().manual_seed(2)
    n, k = 4, 5
    ls = torch.randn(n, k, generator=g, requires_grad=True)
    lt = torch.randn(n, k, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 4, 2])
    feats = {"stages": ([torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 4, 4, 4, generator=g)],
                        [torch.randn(n, 5, 8, 8, generator=g), torch.randn(n, 6, 4, 4, generator=g)]),
             "hint": ([torch.randn(n, 3, 8, 8, generator=g)], [torch.randn(n, 6, 4, 4, generator=g)]),
             "last_map": ([torch.randn(n, 4, 4, 4, generator=g)], [torch.randn(n, 6, 2, 2, generator=g)]),
             "penultimate": ([torch.randn(n, 7, generator=g)], [torch.randn(n, 9, generator=g)]),
             None: ([], [])}
    for name, spec in kf.METHODS.items():
        fs, ft = feats[spec.layers]
        fs = [f.clone().requires_grad_(True) for f in fs]
        ft = [f.clone().requires_grad_(True) for f in ft]
        extra = {"k": 3} if name == "crd" else {}
        m = spec.build([f.shape[1:] for f in fs], [f.shape[1:] for f in ft], n_data=10, **extra)
        batch = kf.KDBatch(ls, lt, y, student_feats=fs, teacher_feats=ft, index=torch.tensor([0, 3, 5, 9]),
                           contrast_index=torch.tensor([[0, 1, 2, 4], [3, 1, 2, 4], [5, 6, 7, 8], [9, 8, 1, 2]]),
                           epoch=5)
        out = m(batch)
        factor = 5 / 20 if name == "dkd" else 1.0
        assert torch.allclose(out["loss"], out["ce"] + out["kd"], rtol=1e-6, atol=0), name
        assert torch.allclose(out["kd"], spec.defaults["weight"] * factor * out["kd_raw"], rtol=1e-6, atol=0), name
        assert torch.equal(out["ce"], F.cross_entropy(ls, y)), name
        out["loss"].backward()
        assert lt.grad is None and all(f.grad is None for f in ft), name
        assert ls.grad is not None and all(f.grad is not None for f in fs), name
        assert bool(list(m.parameters())) == spec.trainable, name
        ls.grad = None
        with_kd = spec.build([f.shape[1:] for f in fs], [f.shape[1:] for f in ft], n_data=10, kd_alpha=0.5, **extra)
        with_kd.load_state_dict(m.state_dict())
        out2 = with_kd(batch)
        kl = label_kd_loss(ls, lt, y, alpha=1.0)["kd"]
        assert torch.allclose(out2["kl"], kl, rtol=1e-6, atol=0), name


def test_a_method_under_bf16_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(4)
    m = kf.build("sp")
    fs, ft = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 5, 2, 2, generator=g)
    ls, lt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    ref = m(kf.KDBatch(ls, lt, y, student_feats=[fs.bfloat16().float()], teacher_feats=[ft.bfloat16().float()]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(kf.KDBatch(ls.bfloat16().float(), lt, y, student_feats=[fs.bfloat16()], teacher_feats=[ft.bfloat16()]))
    assert out["loss"].dtype == torch.float32
    assert torch.allclose(out["kd_raw"], ref["kd_raw"], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------------------
# which layers, by hooks, on any model
def test_layers_by_role_on_a_kdprobe_resnet(tiny_resnet):
    x = torch.zeros(2, 1, 28, 28)
    assert kf.stage_layers(tiny_resnet, x) == ["layer1", "layer2", "layer3"]
    assert kf.layers_for("hint", tiny_resnet, x) == ["layer2"]
    assert kf.layers_for("last_map", tiny_resnet, x) == ["layer3"]
    assert kf.layers_for("penultimate", tiny_resnet, x) == ["fc:in"]
    assert kf.layers_for(None, tiny_resnet, x) == []
    names = kf.parameters_up_to(tiny_resnet, "layer2", x)
    assert "conv1.weight" in names and any(n.startswith("layer2.") for n in names)
    assert not any(n.startswith(("layer3.", "fc.")) for n in names)
    before = kf.parameters_up_to(tiny_resnet, "layer2:in", x)
    assert any(n.startswith("layer1.") for n in before) and not any(n.startswith("layer2.") for n in before)
    tiny_resnet.stage_layers = ["layer2", "layer3"]
    assert kf.stage_layers(tiny_resnet, x) == ["layer2", "layer3"]


class _PreActNet(torch.nn.Module):
    """A WRN-like pre-activation net: each stage starts with BN-ReLU at the previous size, then a strided conv."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.block1 = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.block2 = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1))
        self.block3 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.se = nn.Conv2d(8, 8, 1)  # a 1x1 map (squeeze-excitation-like): no stage
        self.bn, self.relu = nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = x * torch.sigmoid(self.se(self.pool(x)))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


def test_stages_are_stage_outputs_not_the_next_stage_preactivation():
    x = torch.zeros(2, 1, 8, 8)
    assert kf.stage_layers(_PreActNet(), x) == ["block1", "block2", "relu"]
    nn = torch.nn
    flat = nn.Sequential()
    flat.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    flat.pool, flat.flat, flat.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    assert kf.stage_layers(flat, x) == ["features.4", "features"]  # the first size's ReLU is dropped like a stem
