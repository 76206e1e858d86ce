"""fp32 means fp32: the TF32 switches are off inside every fp32 probe, on under "tf32", and put back after."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from kdprobe.models import create_model
from kdprobe.runtime.precision import (deterministic, determinism_state, fp32_exact, numerics, numerics_state,
                               tf32_enabled)


def _tiny():
    torch.manual_seed(0)
    return create_model("resnet8b", num_classes=10, in_channels=1, width=0.25).eval()


class Spy:
    """Wraps a module's forward and records tf32_enabled() at every call."""

    def __init__(self, module: nn.Module):
        self.seen: list[bool] = []
        original = module.forward

        def forward(*args, **kwargs):
            self.seen.append(tf32_enabled())
            return original(*args, **kwargs)

        module.forward = forward


def test_numerics_sets_and_restores_every_switch():
    before = numerics_state()
    with numerics("tf32"):
        assert tf32_enabled()
        with fp32_exact():
            assert not tf32_enabled()
            inside = numerics_state()
            assert inside["float32_matmul_precision"] == "highest"
            # this build has the fp32_precision switches: every one says ieee
            assert all(v == "ieee" for k, v in inside.items() if k != "float32_matmul_precision")
        assert tf32_enabled()
    assert numerics_state() == before
    with pytest.raises(ValueError, match="expected precision in"):
        with numerics("fp16"):
            pass
    assert numerics_state() == before


def test_the_build_default_is_tf32_convolutions():
    # why the probes must switch it off: cuDNN convolutions on this torch build default to TF32
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch without the fp32_precision switches")
    with numerics("tf32"):
        pass
    assert torch.backends.cudnn.conv.fp32_precision in ("tf32", "none", "ieee")


def test_restored_after_an_exception():
    before = numerics_state()
    with pytest.raises(RuntimeError):
        with fp32_exact():
            raise RuntimeError("boom")
    assert numerics_state() == before


def test_landscape_runs_with_tf32_off_and_on_when_asked():
    from kdprobe.probes.landscape_eval import PointEvaluator

    model = _tiny()
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 10
    stacked = {n: t.detach()[None] for n, t in [*model.named_parameters(), *model.named_buffers()]}
    with numerics("tf32"):  # a caller (or the build default) with TF32 on
        ev = PointEvaluator(model, x, y, fold_bn=False)
        spy = Spy(ev.eval_module)
        a = ev(stacked)
        assert spy.seen and not any(spy.seen), "the fp32 landscape ran with TF32 on"
        assert tf32_enabled()  # put back
        ev32 = PointEvaluator(model, x, y, precision="tf32", fold_bn=False)
        spy = Spy(ev32.eval_module)
        b = ev32(stacked)
        assert spy.seen and all(spy.seen)
        assert ev32.precision == "tf32"
    # on a CPU TF32 changes nothing: the same numbers
    assert torch.equal(a[0], b[0])


def test_surface_records_tf32(tiny_resnet):
    from kdprobe.probes.landscape import compute_surface, make_directions

    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    d = make_directions(tiny_resnet, seed=0)
    r = compute_surface(tiny_resnet, x, y, xcoords=[0.0], ycoords=[0.0], directions=d, precision="tf32")
    assert r.precision == "tf32"


def test_bn_fold_check_runs_in_true_fp32():
    import importlib

    bn_fold = importlib.import_module("kdprobe.probes.bn_fold")

    model = _tiny()
    x = torch.randn(4, 1, 8, 8)
    folded, pairs, how = bn_fold.fold_plan(model, x)
    assert folded is not None and pairs
    spy = Spy(folded)
    with numerics("tf32"):
        assert bn_fold.agrees(model, folded, pairs, x)
        assert tf32_enabled()
    assert spy.seen and not any(spy.seen)


def test_diversity_jacobian_runs_in_true_fp32():
    from kdprobe.probes.diversity import input_jacobian, jacobian_score

    model = _tiny()
    spy = Spy(model)
    x = torch.randn(3, 1, 8, 8)
    with numerics("tf32"):
        jacobian_score(model, x)
        input_jacobian(model, x)
        assert tf32_enabled()
    assert len(spy.seen) >= 2 and not any(spy.seen)


def test_sharpness_runs_in_true_fp32():
    import importlib

    sh = importlib.import_module("kdprobe.probes.sharpness")  # the package exports a function of that name

    model = _tiny()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    seen = []
    original = sh.functional_call

    def spy(*args, **kwargs):
        seen.append(tf32_enabled())
        return original(*args, **kwargs)

    sh.functional_call = spy
    try:
        with numerics("tf32"):
            sh.sharpness(model, x, y, iterations=2, trace_samples=2, tol=0)
            assert tf32_enabled()
    finally:
        sh.functional_call = original
    assert seen and not any(seen)


def test_deterministic_sets_and_restores(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = determinism_state()
    with deterministic(True) as st:
        assert st == {"cudnn_deterministic": True, "cudnn_benchmark": False, "deterministic_algorithms": True,
                      "cublas_workspace_config": ":4096:8"}
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    after = determinism_state()
    assert {k: v for k, v in after.items() if k != "cublas_workspace_config"} == \
        {k: v for k, v in before.items() if k != "cublas_workspace_config"}
    with deterministic(False) as st:
        assert st["cudnn_benchmark"] and not st["deterministic_algorithms"]
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_users_cublas_setting_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic(True) as st:
        assert st["cublas_workspace_config"] == ":16:8"


def test_logits_features_and_evaluate_run_in_true_fp32():
    from kdprobe.probes.evaluate import evaluate
    from kdprobe.probes.cka import CkaCache
    from kdprobe.probes.predictions import model_logits

    model = _tiny()
    spy = Spy(model)
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    with numerics("tf32"):
        model_logits(model, x, mean=(0.5,), std=(0.25,), batch_size=4)
        evaluate(model, x, torch.arange(6) % 10, (0.5,), (0.25,))
        CkaCache(x.float(), estimator="exact", batch_size=4).add("m", model)
        assert tf32_enabled()  # the caller's setting is back after each
    assert len(spy.seen) >= 4 and not any(spy.seen)  # 2 logit batches, 1 evaluate, 1 CKA batch
