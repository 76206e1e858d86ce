"""Shared fixtures: tiny models and tiny data, so the suite stays fast on 2 CPU cores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # decoded-dataset cache per test session, never the user's ~/.cache
    monkeypatch.setenv("KDPROBE_CACHE", str(tmp_path_factory.getbasetemp() / "kdprobe-cache"))


@pytest.fixture
def tiny_resnet():
    from kdprobe.models import create_model

    torch.manual_seed(0)
    return create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)


@pytest.fixture
def tiny_imagefolder(tmp_path) -> Path:
    """A 3-class image folder of 8x8 RGB PNGs (train 6/class, test 2/class)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "folder"
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog", "emu"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def shared_cifar_available() -> bool:
    return SHARED_CIFAR.exists()


#: modules whose tests compare numbers computed two ways (batched vs naive, fp32 vs float64, ours vs a reference)
#: under a tolerance: marked `numeric`, and `make test-portable` runs them again on another CPU kernel set, so a
#: tolerance that only holds for this CPU's kernels fails in CI instead of on someone else's machine
NUMERIC_MODULES = frozenset({
    "test_agreement", "test_barrier", "test_bn_fold", "test_calibration", "test_cka", "test_compare",
    "test_diversity", "test_landscape", "test_landscape_files", "test_machine", "test_preprocess", "test_pruning",
    "test_recipes_units", "test_sharpness", "test_stats", "test_surplus", "test_zoo_rnp",
})
#: numeric tests left out of the portable run for time (each 10-20 s on 2 cores); the full suite still runs them
NUMERIC_SLOW = frozenset({"test_torchrun_two_ranks_equal_one", "test_the_input_hook_survives_folding",
                          "test_a_fixed_head_model_names_the_size_it_needs"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in NUMERIC_MODULES and item.originalname not in NUMERIC_SLOW:
            item.add_marker(pytest.mark.numeric)


def pytest_report_header(config):
    from kdprobe.runtime.machine import describe, machine

    return f"kdprobe machine: {describe(machine())}"


def pytest_configure(config):
    # tiny tensors: one thread avoids oversubscription on small shared machines (10-50x faster here).
    # KDPROBE_TEST_THREADS=2 runs the suite with two intra-op threads (reductions split into partial
    # sums), as `make test-portable` does: tolerances must hold for either.
    torch.set_num_threads(int(os.environ.get("KDPROBE_TEST_THREADS", "1")))


def settle_bn(model, seed: int = 0, side: int = 32):
    """Random BN affine terms, running stats from one train-mode batch, then jittered, eval mode:
    so BN is far from identity and a wrong channel order or statistic shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.weight.data = 0.5 + 0.5 * torch.rand(m.num_features, generator=g)
        m.bias.data = 0.2 * torch.randn(m.num_features, generator=g)
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, side, side, generator=g))
    for m in bns:
        m.momentum = 0.1
        m.running_mean.add_(0.05 * torch.randn(m.num_features, generator=g))
        m.running_var.mul_(0.9 + 0.2 * torch.rand(m.num_features, generator=g))
    return model.eval()


class StepLog:
    """A trainers.loop.Progress that keeps every step's logged loss terms (for few-step training tests)."""

    def __init__(self):
        self.terms = []

    def start(self, *a): ...
    def epoch(self, *a): ...
    def close(self): ...

    def step(self, n, postfix):
        self.terms.append(postfix)
