"""Landscape chunks are bounded by memory: sized from free memory, halved on out-of-memory, same numbers."""
from __future__ import annotations

import warnings

import pytest
import torch

from kdprobe.errors import KdprobeError
from kdprobe.models import create_model
from kdprobe.runtime.precision import NumericsWarning
from kdprobe.probes import landscape_eval as le

GB = 1 << 30


def test_plan_chunks_from_given_figures():
    # the case: a 224-px model whose first activation alone is ~26 GB at 8 points x 1024 samples,
    # i.e. ~3.2 MB per sample and point, say 4x that over all layers; an 80 GB GPU with 70 GB free
    # plans 70/2 GB for activations: 344 samples per forward at 8 points, not 1024
    per = 4 * (26 * GB // (8 * 1024))
    p, n = le.plan_chunks(70 * GB, per, 8, 1024)
    assert (p, n) == (8, 344) and n * p * per <= 35 * GB < (n + 1) * p * per
    # plenty of memory: the upper bounds stand
    assert le.plan_chunks(70 * GB, 1000, 8, 1024) == (8, 1024)
    # weights per point count too: 8 points of 5 GB weights do not fit in 35 GB, 4 do
    p, n = le.plan_chunks(70 * GB, 8 << 20, 8, 1024, point_bytes=5 * GB)
    assert p == 4 and n == int((35 * GB - 4 * 5 * GB) // (4 * (8 << 20))) == 480
    # not even one sample at one point: plan 1 x 1 (the forward's OOM is then reported)
    assert le.plan_chunks(1 << 20, 1 << 30, 8, 1024) == (1, 1)
    # unknown free memory or no estimate: the bounds as given
    assert le.plan_chunks(None, 1 << 20, 8, 1024) == (8, 1024)
    assert le.plan_chunks(1 << 20, 0, 8, 1024) == (8, 1024)


def test_activation_bytes_counts_every_output():
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 8 * 8, 10))
    x = torch.randn(1, 1, 8, 8)
    # input 64, conv 256, relu 256, flatten 256, linear 10, the module's output 10 (floats of 4 bytes)
    assert le.activation_bytes(m, x) == 4 * (64 + 256 + 256 + 256 + 10 + 10)


def _setup():
    torch.manual_seed(0)
    model = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25).eval()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    g = torch.Generator().manual_seed(1)
    stacked = {n: t.detach()[None] + 0.01 * torch.randn((3, *t.shape), generator=g) if t.is_floating_point()
               else t.detach()[None].expand(3, *t.shape)
               for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return model, x, y, stacked


def test_samples_per_forward_follow_free_memory():
    model, x, y, _ = _setup()
    ev = le.PointEvaluator(model, x, y)
    assert ev.per_sample_bytes > 0
    # room for exactly 5 samples at 2 points (after their weights), in half the free memory
    free = 2 * (2 * ev.point_bytes + 2 * 5 * ev.per_sample_bytes)
    assert ev.samples_per_forward(2, free_bytes=free) == 5
    assert ev.samples_per_forward(2) == 5  # planned once per points count
    big = le.PointEvaluator(model, x, y)
    assert big.samples_per_forward(1, free_bytes=1 << 40) == big.batch_size
    fixed = le.PointEvaluator(model, x, y, batch_size=7)
    assert fixed.samples_per_forward(3, free_bytes=1) == 7  # the caller's choice is not planned


def _oom_when(limit: int, monkeypatch, kind=torch.cuda.OutOfMemoryError):
    calls = []
    original = le.PointEvaluator._forward

    def forward(self, params, xb, P):
        calls.append((P, xb.shape[0]))
        if P * xb.shape[0] > limit:
            raise kind("CUDA out of memory. Tried to allocate 26.00 GiB" if kind is RuntimeError else "fake")
        return original(self, params, xb, P)

    monkeypatch.setattr(le.PointEvaluator, "_forward", forward)
    return calls


@pytest.mark.parametrize("kind", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_out_of_memory_halves_the_samples_and_gives_the_same_numbers(monkeypatch, kind):
    model, x, y, stacked = _setup()
    want = le.PointEvaluator(model, x, y, batch_size=40)(stacked)  # one forward: unchunked
    same_chunks = le.PointEvaluator(model, x, y, batch_size=10)(stacked)
    calls = _oom_when(30, monkeypatch, kind)  # 3 points x 10 samples fit; 3 x 20 do not
    ev = le.PointEvaluator(model, x, y, batch_size=40)
    with pytest.warns(NumericsWarning, match="out of memory .* continuing with 20 samples"):
        got = ev(stacked)
    assert ev.samples_for[3] == 10
    assert (3, 40) in calls and (3, 20) in calls and calls[-1] == (3, 10)
    assert torch.equal(got[0], same_chunks[0]) and torch.equal(got[1], same_chunks[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert torch.equal(got[1], want[1])
    n = len(calls)
    ev(stacked)  # the next call starts at the smaller chunk: no new failures
    assert len(calls) == n + 4 and all(c == (3, 10) for c in calls[n:])


def test_out_of_memory_at_one_sample_splits_the_points(monkeypatch):
    model, x, y, stacked = _setup()
    want = le.PointEvaluator(model, x, y, batch_size=40)(stacked)
    _oom_when(1, monkeypatch)  # only 1 point x 1 sample fits
    ev = le.PointEvaluator(model, x, y, batch_size=2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = ev(stacked)
    msgs = [str(m.message) for m in w if issubclass(m.category, NumericsWarning)]
    assert any("continuing with 1 and 2 points" in m for m in msgs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    assert torch.equal(got[1], want[1])


def test_out_of_memory_at_one_sample_and_point_is_a_clear_error(monkeypatch):
    model, x, y, stacked = _setup()
    _oom_when(0, monkeypatch)
    ev = le.PointEvaluator(model, x, y, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KdprobeError, match="out of memory evaluating one sample at one point"):
            ev({k: v[:1] for k, v in stacked.items()})


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch):
    model, x, y, stacked = _setup()

    def broken(self, params, xb, P):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(le.PointEvaluator, "_forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        le.PointEvaluator(model, x, y)(stacked)


def test_surface_points_follow_memory(monkeypatch, tiny_resnet):
    from kdprobe.probes import landscape as ls

    ev = le.PointEvaluator(tiny_resnet, torch.randn(4, 1, 8, 8), torch.arange(4))
    monkeypatch.setattr(ls, "default_chunking", lambda device, precision="fp32": (8, 1024))
    monkeypatch.setattr(ls, "free_memory", lambda device: 2 * 3 * (ev.point_bytes + ev.per_sample_bytes))
    assert ls._points_per_batch(None, ev) == 2  # 8 do not fit, 4 do not, 2 do (3 would)
    assert ls._points_per_batch(5, ev) == 5  # the caller's figure stands
