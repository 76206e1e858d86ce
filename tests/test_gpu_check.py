"""GPU readiness checked on a CPU: bench/gpu_check's row-by-row JSON, and no host syncs in the per-step GPU paths."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_step_is_a_row_and_the_rest_still_run(gc, tmp_path):
    out = tmp_path / "g.json"
    assert gc.main(["--steps", "landscape,diversity", "--fail", "landscape", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["versions"]["torch"] == torch.__version__
    assert "numerics_default" in doc["versions"]
    land, div = [r for r in doc["rows"] if r["step"] == "landscape"], [r for r in doc["rows"] if r["step"] == "diversity"]
    assert len(land) == 1 and land[0]["value"] is None and "forced failure" in land[0]["note"]
    assert len(div) == 1 and div[0]["value"] > 0 and "if taken under TF32" in div[0]["note"]


def test_rows_are_written_as_they_finish_and_kept_when_stopped(gc, tmp_path, monkeypatch):
    out = tmp_path / "g.json"

    def stopped(*args, **kwargs):
        # the time cap arrives while the diversity step runs: the rows before it are already on disk
        doc = json.loads(out.read_text())
        assert [r["step"] for r in doc["rows"]] == ["determinism"] and doc["complete"] is False
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "diversity_time", stopped)
    assert gc.main(["--steps", "determinism,diversity", "--json", str(out)]) == 130
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["stopped"].startswith("interrupted")
    assert [r["step"] for r in doc["rows"]] == ["determinism"] and doc["rows"][0]["value"] > 0


def test_unknown_steps_are_refused(gc, tmp_path):
    with pytest.raises(SystemExit):
        gc.main(["--steps", "landscpe", "--json", str(tmp_path / "g.json")])


def test_landscape_warm_up_takes_both_paths_the_timed_grid_takes(gc, monkeypatch):
    from kdprobe.probes import landscape as ls
    from kdprobe.probes import landscape_eval as le

    monkeypatch.setattr(le, "default_chunking", lambda device, precision="fp32": (4, 64))
    monkeypatch.setattr(ls, "default_chunking", lambda device, precision="fp32": (4, 64))
    seen = []
    original = le.PointEvaluator._forward

    def spy(self, params, xb, P):
        seen.append(P)
        return original(self, params, xb, P)

    monkeypatch.setattr(le.PointEvaluator, "_forward", spy)
    calls = []
    real = ls.compute_surface

    def surface(*args, **kwargs):
        before = len(seen)
        res = real(*args, **kwargs)
        calls.append(sorted(set(seen[before:])))
        return res

    monkeypatch.setattr(ls, "compute_surface", surface)
    data = gc.synthetic(64)
    rates = gc.landscape_rate(data, torch.device("cpu"), model="resnet8b", samples=16, steps=3, precisions=("fp32",))
    assert calls[0] == [1, 4]  # warm-up: a full vmap chunk and a single point
    assert set(calls[1]) <= set(calls[0])  # the timed grid (9 points: 4 + 4 + 1) meets nothing new
    assert rates["fp32"][1] == 0.0


def test_gpu_check_sh_caps_with_a_kill_and_installs_nothing():
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "timeout -k" in text
    for path in ("bench/gpu_check.sh", "bench/gpu_check.py"):
        assert "pip install" not in (ROOT / path).read_text()


# --- the per-step GPU paths read nothing back (a host sync each), checked on a CPU -------------------

class NoHostReads:
    """Within the block, reading a tensor's value on the host raises (float, int, bool, item, tolist)."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("a tensor value was read on the host")

        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu"):
            self.mp.setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        self.mp.undo()


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8).float(), torch.arange(n) % 3


def test_device_cutmix_reads_nothing_back_and_equals_the_host_one(monkeypatch):
    from trainers.augment import _cutmix_on_device, cutmix, mixed_cross_entropy

    x, y = _images()
    mixed = kept = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        host = cutmix(x, y, g, prob=0.5)
        g2 = torch.Generator().manual_seed(seed)
        with NoHostReads(monkeypatch):
            dev = _cutmix_on_device(x, y, g2, 0.5, 1.0)
        if host.perm is not None:  # mixed: the same draws, the same batch
            mixed += 1
            assert torch.equal(dev.x, host.x) and torch.equal(dev.y_b, host.y_b)
            assert float(dev.lam) == host.lam and torch.equal(g.get_state(), g2.get_state())
        else:
            kept += 1
            assert torch.equal(dev.x, x) and torch.equal(dev.y_b, y) and float(dev.lam) == 1.0
        logits = torch.randn(len(y), 3, generator=torch.Generator().manual_seed(seed))
        want = mixed_cross_entropy(logits, host.y_a, host.y_b, host.lam)
        got = mixed_cross_entropy(logits, dev.y_a, dev.y_b, dev.lam)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert mixed > 5 and kept > 5


def test_auto_augment_copies_its_draws_once_per_batch(monkeypatch):
    from trainers.augment import apply_auto_augment, draw_auto_augment

    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    draw = draw_auto_augment(16, torch.Generator().manual_seed(0))
    want = apply_auto_augment(x, draw)
    copies = []
    real = torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    got = apply_auto_augment(x, draw)
    assert len(copies) == 1
    assert torch.equal(got, want)


def test_cka_minibatch_sums_stay_on_the_device(monkeypatch):
    import importlib

    cka = importlib.import_module("kdprobe.probes.cka")
    g = torch.Generator().manual_seed(0)
    fa = {"l1": torch.randn(12, 5, generator=g, dtype=torch.float64), "l2": torch.randn(12, 3, generator=g,
                                                                                        dtype=torch.float64)}
    fb = {"m": torch.randn(12, 4, generator=g, dtype=torch.float64)}
    acc = cka._Accumulator(["l1", "l2"], ["m"], "minibatch", False, {"l1": 5, "l2": 3, "m": 4}, torch.device("cpu"))
    with NoHostReads(monkeypatch):
        acc.update(fa, fb)
        acc.update(fa, fb)
    m = acc.matrix()
    # the same numbers as summing on the host batch by batch (what the code did before)
    gram = {k: cka._shift(v, None)[0] for k, v in {**fa, **fb}.items()}
    gram = {k: v @ v.T for k, v in gram.items()}
    h = lambda a, b: 2 * float(cka.hsic1(gram[a], gram[b]))  # noqa: E731  (two equal minibatches)
    assert m == [[cka._cka(h("l1", "m"), h("l1", "l1"), h("m", "m"))], [cka._cka(h("l2", "m"), h("l2", "l2"),
                                                                               h("m", "m"))]]


# --- kdprobe compare says why two GPU runs may differ --------------------------------------------------

def _summary(device, gpu, torch_version="2.14.1"):
    return {"format": "kdprobe-study", "name": "t", "device": device, "accuracy": [{"value": 91.5}],
            "versions": {"torch": torch_version, "torchvision": "0.29.1", "device_name": gpu,
                         **({"machine": {"cpu": "x", "cuda": gpu, "cuda_capability": "9.0"}} if gpu != "cpu" else {})}}


def test_gpu_reasons_name_what_differs():
    from kdprobe.studies.compare import gpu_reasons

    assert gpu_reasons(_summary("cpu", "cpu"), _summary("cpu", "cpu")) == []
    lines = gpu_reasons(_summary("cuda", "NVIDIA H100"), _summary("cuda", "NVIDIA A100", "2.9.0"))
    assert "deterministic kernels" in lines[0] and "--nproc-per-cell" in lines[0]
    assert lines[1] == "these two differ in: GPU NVIDIA H100 vs NVIDIA A100; torch 2.14.1 vs 2.9.0"
    same = gpu_reasons(_summary("cuda", "NVIDIA H100"), _summary("cuda", "NVIDIA H100"))
    assert "--no-deterministic" in same[1]
    mixed = gpu_reasons(_summary("cpu", "cpu"), _summary("cuda", "NVIDIA H100"))
    assert mixed[1].startswith("these two differ in: device cpu vs cuda; GPU cpu vs NVIDIA H100")


def test_compare_prints_the_gpu_reasons(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_summary("cuda", "NVIDIA H100")))
    b.write_text(json.dumps(dict(_summary("cuda", "NVIDIA H200"), accuracy=[{"value": 91.25}])))
    r = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert r.exit_code == 1, r.output
    assert "gpu   these two differ in: GPU NVIDIA H100 vs NVIDIA H200" in r.output
    c = tmp_path / "c.json"
    c.write_text(json.dumps(_summary("cpu", "cpu")))
    r = CliRunner().invoke(app, ["compare", str(c), str(c)])
    assert r.exit_code == 0 and "gpu " not in r.output
