"""Resume restores torch's global generators: a killed and resumed model with dropout ends bit-equal."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from kdprobe.checkpoints.format import read_payload
from trainers.config import TrainConfig
from trainers.loop import partial_path, restore_rng_states, rng_states, train

USER_CODE = """
import torch.nn as nn


class DropNet(nn.Module):
    # dropout draws from torch's global generator, not from the loop's seeded one
    def __init__(self, num_classes, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.conv(x).relu().flatten(1)))
"""


@pytest.fixture
def dropnet(tmp_path, monkeypatch):
    pkg = tmp_path / "droppkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "python:droppkg.nets:DropNet"
    for name in [m for m in sys.modules if m.startswith("droppkg")]:
        del sys.modules[name]


def _weights(path):
    return read_payload(path)["state_dict"]


@pytest.mark.parametrize("stop_at", [4, 6])  # 4 steps per epoch: killed after epoch 1, and mid-epoch 2
def test_dropout_model_resumed_equals_uninterrupted(tmp_path, dropnet, stop_at):
    cfg = TrainConfig(model=dropnet, dataset="digits", train_subset=256, epochs=2, batch_size=64, augment="none")
    ref = train(cfg, tmp_path / "ref.pt").path
    out = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, stop_after_steps=stop_at)
    saved = read_payload(partial_path(out))
    assert set(saved["rng"]) == {"cpu"} and saved["rng"]["cpu"].dtype == torch.uint8
    torch.manual_seed(123)  # whatever the process did in between
    train(cfg, out)
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_payload(ref)["meta"]["history"] == read_payload(out)["meta"]["history"]


def test_dropout_actually_draws_from_the_global_generator(tmp_path, dropnet):
    # the test above would pass trivially if nothing drew from the global generator: two runs whose
    # global streams differ after initialization must end differently
    cfg = TrainConfig(model=dropnet, dataset="digits", train_subset=128, epochs=1, batch_size=64, augment="none")
    a = train(cfg, tmp_path / "a.pt").path
    import trainers.loop as loop

    # perturb the global stream right after the model is built: the Recipe constructor runs after it
    orig_recipe = loop.Recipe

    class Perturbed(orig_recipe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            torch.rand(1)

    loop.Recipe = Perturbed
    try:
        b = train(cfg, tmp_path / "b.pt").path
    finally:
        loop.Recipe = orig_recipe
    wa, wb = _weights(a), _weights(b)
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rng_states_round_trip():
    cpu = torch.device("cpu")
    s = rng_states(cpu)
    x = torch.rand(5)
    restore_rng_states(s, cpu)
    assert torch.equal(torch.rand(5), x)
    restore_rng_states(None, cpu)  # a partial from before the states were saved: nothing to do


def test_checkpoint_records_numerics(tmp_path, dropnet):
    cfg = TrainConfig(model=dropnet, dataset="digits", train_subset=64, epochs=1, batch_size=64, augment="none")
    meta = read_payload(train(cfg, tmp_path / "n.pt").path)["meta"]
    assert meta["numerics"] == {"autocast": None, "tf32": False}
