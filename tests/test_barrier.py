"""Barrier along a path: hand-computed on made-up curves, zero for a linear one, end points required."""
import numpy as np
import pytest

from kdprobe.errors import KdprobeError
from kdprobe.probes.barrier import barrier
from kdprobe.probes.landscape import LineResult


def _line(ts, loss, acc=None, bn="eval"):
    ts = np.asarray(ts, float)
    acc = np.full(ts.size, 0.9) if acc is None else np.asarray(acc, float)
    return LineResult(ts, np.asarray(loss, float), acc, np.ones(ts.size, bool), bn, "fp32", 100)


def test_hand_computed_barrier():
    # L(A)=1, L(B)=2: the line is 1 + t; loss(0.5)=3 -> 3 - 1.5 = 1.5; loss(0.25)=2 -> 2 - 1.25 = 0.75
    b = barrier(_line([0, 0.25, 0.5, 0.75, 1], [1.0, 2.0, 3.0, 2.0, 2.0], acc=[0.90, 0.80, 0.50, 0.85, 0.88], bn="recompute"))
    assert b.loss_barrier == pytest.approx(1.5) and b.t_loss == 0.5
    assert (b.loss_a, b.loss_b, b.points, b.bn) == (1.0, 2.0, 5, "recompute")
    # errors (fractions) 0.10, 0.20, 0.50, 0.15, 0.12: line 0.10 + 0.02t -> at 0.5: 0.50 - 0.11 = 0.39
    assert b.error_barrier == pytest.approx(0.39) and b.t_error == 0.5


def test_linear_path_has_no_barrier_and_extrapolation_is_ignored():
    ts = np.linspace(-0.5, 1.5, 81)
    loss = 2.0 - 0.5 * ts  # linear everywhere
    loss[ts < 0] += 10.0  # a huge bump outside [0, 1] must not count
    b = barrier(_line(ts, loss))
    assert b.loss_barrier == pytest.approx(0.0, abs=1e-12) and b.points == 41
    convex = barrier(_line([0, 0.5, 1], [1.0, 0.2, 1.0]))
    assert convex.loss_barrier == 0.0  # below the line everywhere: no barrier


def test_end_points_and_finished_path_required():
    with pytest.raises(KdprobeError, match="include t = 1"):
        barrier(_line([0, 0.3, 0.9], [1, 2, 1]))
    unfinished = LineResult(np.array([0.0, 1.0]), np.array([1.0, np.nan]), np.array([1.0, np.nan]),
                            np.array([True, False]), "eval", "fp32", 10)
    with pytest.raises(KdprobeError, match="finished"):
        barrier(unfinished)


def test_interpolate_prints_and_stores_the_barrier(tmp_path):
    import torch
    from typer.testing import CliRunner

    import typer
    from cli.common import handle_errors
    from cli.landscape import interpolate
    from kdprobe.checkpoints.format import save_checkpoint
    from kdprobe.models import create_model
    from kdprobe.writers.landscape_h5 import read_line_h5

    paths = []
    for s in (0, 1):
        torch.manual_seed(s)
        m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
        paths.append(save_checkpoint(tmp_path / f"m{s}.pt", m, {"method": "scratch", "seed": s, "dataset": "digits"}))
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("interpolate")(handle_errors(interpolate))
    res = CliRunner().invoke(app, ["interpolate", *map(str, paths), "--out", str(tmp_path / "p.h5"), "--steps", "5",
                                   "--samples", "30", "--device", "cpu", "--precision", "fp32", "--bn", "recompute"])
    assert res.exit_code == 0, res.output
    line, attrs = read_line_h5(tmp_path / "p.h5")
    b = barrier(line)
    assert attrs["loss_barrier"] == pytest.approx(b.loss_barrier, rel=1e-12)
    assert attrs["error_barrier"] == pytest.approx(b.error_barrier, rel=1e-12) and attrs["bn"] == "recompute"
    assert f"loss {b.loss_barrier:.4f}" in res.output and "bn=recompute" in res.output
