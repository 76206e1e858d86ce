"""Run under torchrun by tests/test_landscape.py: a seeded tiny surface, split across ranks.

Usage: torchrun --standalone --nproc-per-node 2 tests/_landscape_ddp_script.py OUT.npz
Rank 0 saves loss, acc, done and the world size; build() is shared with the test so the
single-process reference sees exactly the same model, data and directions.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

GRID_X, GRID_Y = "-1:1:5", "-0.5:0.5:4"


def build():
    """A tiny ResNet with non-trivial BN statistics, 24 8x8 inputs, labels, directions."""
    from kdprobe.models import create_model
    from kdprobe.probes.landscape import make_directions

    torch.manual_seed(0)
    model = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8, generator=g))
    model.eval()
    x = torch.randn(24, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (24,), generator=g)
    return model, x, y, make_directions(model, seed=3)


def main(out: str) -> None:
    from kdprobe.probes.distributed import init_from_env, rank_world, shutdown
    from kdprobe.probes.landscape import compute_surface, parse_grid

    init_from_env("cpu")
    model, x, y, dirs = build()
    res = compute_surface(model, x, y, xcoords=parse_grid(GRID_X), ycoords=parse_grid(GRID_Y), directions=dirs,
                          points_per_batch=2, precision="fp32", batch_size=8)
    rank, world = rank_world()
    if rank == 0:
        np.savez(out, loss=res.loss, acc=res.acc, done=res.done, world=world)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
