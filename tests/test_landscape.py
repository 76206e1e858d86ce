"""Loss-landscape probe: directions, grid, batched vs naive evaluation, resume, interpolation, torchrun."""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.probes.landscape import (check_directions, compute_surface, interpolate, make_directions,
                                      parse_grid)
from tolerance import cross_entropy_atol

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_landscape_ddp_script", ROOT / "tests" / "_landscape_ddp_script.py")
ddp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp)




@pytest.fixture
def setup():
    return ddp.build()


def _naive(model, x, y, theta: dict, bn: str, batch_size: int):
    """Reference: a copy of the model with weights set in place, evaluated point by point."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, t in m.state_dict().items():
            t.copy_(theta[n])
        if bn == "recompute":
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            for i in range(0, len(x), batch_size):
                m(x[i:i + batch_size])
        m.eval()
        logits = m(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).sum().item() / len(y)  # a fraction


def _logits_at(model, x, theta: dict):
    """The logits of a copy of `model` with weights `theta` in eval mode (for a tolerance's magnitude)."""
    m = copy.deepcopy(model)
    m.load_state_dict(theta)
    with torch.no_grad():
        return m.eval()(x)


def _shifted(model, dirs, a, b):
    sd = {n: t.clone() for n, t in model.state_dict().items()}
    for n in dirs.x:
        sd[n] = sd[n] + a * dirs.x[n] + b * dirs.y[n]
    return sd


def test_parse_grid_values_and_errors():
    np.testing.assert_allclose(parse_grid("-1:1:5"), [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(parse_grid("0:1", num=3), [0, 0.5, 1])
    assert parse_grid("0.25:0.25:1").tolist() == [0.25]
    for bad in ("1:2", "a:1:3", "1:0:5", "-1:1:0", "-1:1:2.5", "0:0:3", "", "1:2:3:4"):
        with pytest.raises(KdprobeError, match="expected"):
            parse_grid(bad)
    with pytest.raises(KdprobeError):
        parse_grid("0:1:5", num=5)


def test_directions_are_filter_normalized(setup):
    model = setup[0]
    with torch.no_grad():
        model.bn1.bias.zero_()  # an all-zero BN shift must not give nan with include_bn
    for include_bn in (False, True):
        d = make_directions(model, seed=5, include_bn=include_bn)
        for tag in ("x", "y"):
            for name, w in model.named_parameters():
                v = getattr(d, tag)[name]
                assert v.shape == w.shape and torch.isfinite(v).all()
                if w.dim() <= 1:
                    expect = w.norm().item() if include_bn else 0.0
                    assert v.norm().item() == pytest.approx(expect, rel=1e-5, abs=1e-7), name
                else:
                    for f in range(w.shape[0]):  # one filter = one output channel / row
                        assert v[f].norm().item() == pytest.approx(w[f].norm().item(), rel=1e-5), (name, f)
    a, b = make_directions(model, seed=5), make_directions(model, seed=5)
    assert a.fingerprint() == b.fingerprint()
    assert make_directions(model, seed=6).fingerprint() != a.fingerprint()
    assert not torch.allclose(a.x["conv1.weight"], a.y["conv1.weight"])
    # include_bn changes only the 1-D entries
    c = make_directions(model, seed=5, include_bn=True)
    assert torch.equal(a.x["layer1.0.conv1.weight"], c.x["layer1.0.conv1.weight"])


def test_check_directions_rejects_other_architecture(setup):
    from kdprobe.models import create_model

    other = create_model("resnet8a", num_classes=10, in_channels=1, width=0.25)
    with pytest.raises(KdprobeError, match="names/shapes"):
        check_directions(other, setup[3])


def _with(dirs, tag, fn):
    """A copy of `dirs` whose `tag` direction is fn(name, tensor) per parameter."""
    from kdprobe.probes.landscape import Directions

    x = {n: (fn(n, t) if tag == "x" else t) for n, t in dirs.x.items()}
    y = {n: (fn(n, t) if tag == "y" else t) for n, t in dirs.y.items()}
    return Directions(x, y, dirs.seed, dirs.include_bn)


def test_check_directions_refuses_degenerate_planes(setup):
    """issue 10 item 8: NaN, zero, parallel (|cosine| > 0.99) or integer directions, each with its reason."""
    model, dirs = setup[0], setup[3]
    check_directions(model, dirs)  # the seeded Gaussian pair is fine
    first = next(iter(dirs.x))
    cases = [
        (_with(dirs, "y", lambda n, t: t.clone().fill_(float("nan")) if n == first else t), "NaN or inf"),
        (_with(dirs, "x", lambda n, t: torch.zeros_like(t)), "zero everywhere"),
        (_with(dirs, "y", lambda n, t: -2.5 * dirs.x[n]), "cosine -1.000000"),
        # nearly parallel: y = x + 5% noise has cosine ~0.999 (computed below, independently)
        (_with(dirs, "y", lambda n, t: dirs.x[n] + 0.05 * t), "independent directions"),
        (_with(dirs, "x", lambda n, t: (t * 100).round().to(torch.int32)), "floating-point.*int32"),
    ]
    near = cases[3][0]
    vx = torch.cat([t.flatten().double() for t in near.x.values()])
    vy = torch.cat([t.flatten().double() for t in near.y.values()])
    assert float(vx @ vy / (vx.norm() * vy.norm())) > 0.99
    for bad, words in cases:
        with pytest.raises(KdprobeError, match=words):
            check_directions(model, bad)
    # just under the limit passes: y = x + noise with cosine about 0.98
    ok = _with(dirs, "y", lambda n, t: dirs.x[n] + 0.2 * t)
    vy = torch.cat([t.flatten().double() for t in ok.y.values()])
    assert 0.9 < float(vx @ vy / (vx.norm() * vy.norm())) <= 0.99
    check_directions(model, ok)


def test_huge_grids_are_refused_before_allocating(monkeypatch):
    import kdprobe.probes.landscape as ls

    monkeypatch.setattr(ls, "available_memory", lambda: 8 * 2**30)  # pretend 8 GiB are free
    assert parse_grid("-1:1:1000").size == 1000
    ls.check_grid_memory(1000 * 1000)  # 200 MB
    with pytest.raises(KdprobeError, match=r"100,000,000 points needs about 18.6 GiB .* the 8.0 GiB available"):
        ls.check_grid_memory(10_000 * 10_000)
    with pytest.raises(KdprobeError, match="range '0:1' with 10000000000000 steps"):
        parse_grid("0:1", num=10**13)  # would be 80 TB for the coordinates alone


@pytest.mark.parametrize("bn,P", [("eval", 1), ("eval", 3), ("recompute", 2)])
def test_batched_equals_naive_loop(setup, bn, P):
    model, x, y, dirs = setup
    xs, ys = parse_grid("-1:1:3"), parse_grid("-0.5:0.5:2")  # non-square: 2 rows, 3 columns
    res = compute_surface(model, x, y, xcoords=xs, ycoords=ys, directions=dirs, bn=bn, points_per_batch=P,
                          batch_size=8, precision="fp32")
    assert res.loss.shape == (2, 3) and res.complete
    for i, b in enumerate(ys):
        for j, a in enumerate(xs):
            lo, ac = _naive(model, x, y, _shifted(model, dirs, a, b), bn, 8)
            assert res.loss[i, j] == pytest.approx(lo, abs=1e-4, rel=1e-4), (i, j)
            assert res.acc[i, j] == pytest.approx(ac, abs=1e-5)


def test_centre_equals_checkpoint_loss_and_model_untouched(setup):
    model, x, y, dirs = setup
    model.train()  # the probe must hand the model back exactly as it found it
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compute_surface(model, x, y, xcoords=parse_grid("-1:1:5"), ycoords=parse_grid("-1:1:3"),
                          directions=dirs, points_per_batch=2, precision="fp32")
    assert model.training and all(m.training for m in model.modules())
    assert not model.fc.weight.requires_grad and model.conv1.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()
    with torch.no_grad():
        logits = model(x)
    tol = cross_entropy_atol(model, x, logits)  # batched vs one plain call: rounding only (tests/tolerance.py)
    assert res.loss[1, 2] == pytest.approx(F.cross_entropy(logits, y).item(), rel=0, abs=tol)
    assert res.acc[1, 2] == (logits.argmax(1) == y).sum().item() / len(y)  # a fraction, counted exactly


def test_bf16_close_to_fp32(setup):
    model, x, y, dirs = setup
    kw = dict(xcoords=parse_grid("-0.5:0.5:2"), ycoords=parse_grid("0:0:1"), directions=dirs)
    a = compute_surface(model, x, y, precision="fp32", **kw)
    b = compute_surface(model, x, y, precision="bf16", **kw)
    assert b.precision == "bf16"
    np.testing.assert_allclose(b.loss, a.loss, rtol=0.05)


class _Stop(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(setup):
    model, x, y, dirs = setup
    kw = dict(xcoords=parse_grid("-1:1:4"), ycoords=parse_grid("-1:1:3"), directions=dirs, points_per_batch=2,
              batch_size=8, precision="fp32")
    full = compute_surface(model, x, y, **kw)
    seen = []

    def stop_after_two(partial):
        seen.append(partial)
        if len(seen) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        compute_surface(model, x, y, progress=stop_after_two, **kw)
    partial = seen[-1]
    assert partial.done.sum() == 4 and np.isnan(partial.loss[~partial.done]).all()
    calls = []
    resumed = compute_surface(model, x, y, resume=partial, progress=calls.append, **kw)
    assert len(calls) == 4  # only the 8 missing points were evaluated, 2 per chunk
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-6)
    np.testing.assert_allclose(resumed.acc, full.acc)
    with pytest.raises(KdprobeError, match="same grid"):
        compute_surface(model, x, y, resume=partial, **{**kw, "xcoords": parse_grid("-1:1:5")})


def test_interpolate_endpoints_and_midpoint(setup):
    model_a, x, y, _ = setup
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        for t in model_b.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t)).abs_()  # abs keeps running_var positive
    ts = np.array([0.0, 0.5, 1.0, 1.25])
    res = interpolate(model_a, model_b, x, y, ts, points_per_batch=3, precision="fp32")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k, t in enumerate(ts):
        sd = {n: ((1 - t) * sa[n] + t * sb[n]) if sa[n].is_floating_point() else sa[n] for n in sa}
        lo, ac = _naive(model_a, x, y, sd, "eval", 8)
        # batched and naive evaluation add in different orders; the |B - A| steps blow the loss up to ~3e4
        # (logits ~3e5), so the rounding bound follows the logits (tests/tolerance.py), not a fixed 1e-5
        tol = cross_entropy_atol(model_a, x, _logits_at(model_a, x, sd))
        assert res.loss[k] == pytest.approx(lo, rel=0, abs=tol), t
        assert res.acc[k] == pytest.approx(ac, abs=1e-5)
        if t in (0.0, 1.0):  # the end points are the checkpoints themselves, with their own weights
            ref = model_a if t == 0 else model_b
            assert res.loss[k] == pytest.approx(_naive(ref, x, y, ref.state_dict(), "eval", 8)[0], rel=0, abs=tol)
    # the bound is far below what a wrong mix of weights changes: 1% of the way from A to B moves the loss more
    a_bit = {n: (0.99 * sa[n] + 0.01 * sb[n]) if sa[n].is_floating_point() else sa[n] for n in sa}
    assert abs(_naive(model_a, x, y, a_bit, "eval", 8)[0] - res.loss[0]) > 10 * cross_entropy_atol(
        model_a, x, _logits_at(model_a, x, sa))
    from kdprobe.models import create_model

    with pytest.raises(KdprobeError, match="same architecture"):
        interpolate(model_a, create_model("resnet8a", num_classes=10, in_channels=1, width=0.25), x, y, ts)


def test_torchrun_two_ranks_equal_one(setup, tmp_path):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed next to this python")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ddp.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", WORLD_SIZE="")  # torchrun sets WORLD_SIZE per rank
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "_landscape_ddp_script.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    assert int(got["world"]) == 2 and got["done"].all()
    model, x, y, dirs = setup
    ref = compute_surface(model, x, y, xcoords=parse_grid(ddp.GRID_X), ycoords=parse_grid(ddp.GRID_Y),
                          directions=dirs, points_per_batch=1, precision="fp32", batch_size=8)
    np.testing.assert_allclose(got["loss"], ref.loss, rtol=1e-5)
    np.testing.assert_allclose(got["acc"], ref.acc)
