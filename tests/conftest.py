"""Shared fixtures: tiny models and tiny data, so the suite stays fast on 2 CPU cores."""
from __future__ import annotations

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


def pytest_configure(config):
    # tiny tensors: one thread avoids oversubscription on small shared machines (10-50x faster here)
    torch.set_num_threads(1)
