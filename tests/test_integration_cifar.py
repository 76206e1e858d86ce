"""Real CIFAR-10 (the shared JPEG archive), end to end; skipped where the archive is absent."""
import pytest
import torch

from conftest import SHARED_CIFAR, shared_cifar_available

pytestmark = pytest.mark.skipif(not shared_cifar_available(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")


@pytest.fixture(scope="module")
def cifar():
    from kdprobe.data.datasets import load_dataset
    return load_dataset(f"imagefolder:{SHARED_CIFAR}")


def test_archive_loads_as_cifar10(cifar):
    assert cifar.train_x.shape == (50000, 3, 32, 32) and cifar.test_x.shape == (10000, 3, 32, 32)
    assert cifar.classes[0] == "airplane" and cifar.num_classes == 10
    assert torch.bincount(cifar.train_y).tolist() == [5000] * 10
    assert torch.bincount(cifar.test_y[:500], minlength=10).min() > 20  # shuffled order covers every class
    # per-channel means of decoded JPEGs are close to CIFAR-10's published statistics
    for got, ref in zip(cifar.mean, (0.4914, 0.4822, 0.4465)):
        assert abs(got - ref) < 0.01


def test_train_probe_and_surface_on_real_images(tmp_path, cifar):
    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.data.datasets import normalize
    from kdprobe.probes.evaluate import evaluate
    from kdprobe.probes import compute_surface, jacobian_score, make_directions, parse_grid
    from trainers.config import TrainConfig
    from trainers.loop import train

    cfg = TrainConfig(model="resnet8b", model_kwargs={"width": 0.25}, dataset=f"imagefolder:{SHARED_CIFAR}",
                      train_subset=512, epochs=1, augment="cutmix")
    res = train(cfg, tmp_path / "c.pt")
    ck = load_checkpoint(res.path)
    assert ck.meta["input_shape"] == [3, 32, 32] and ck.meta["method"] == "cutmix"
    ev = evaluate(ck.model, cifar.test_x, cifar.test_y, cifar.mean, cifar.std)
    assert ev.acc == pytest.approx(res.test_acc)
    x = normalize(cifar.train_x[:128], cifar.mean, cifar.std)  # N = 128 < 3*32*32: the paper's setting
    score = jacobian_score(ck.model, x)
    assert -1e4 < score < 0
    xs = ys = parse_grid("-0.5:0.5:3")
    surf = compute_surface(ck.model, x, cifar.train_y[:128], xcoords=xs, ycoords=ys,
                           directions=make_directions(ck.model, seed=0), precision="fp32")
    centre = evaluate(ck.model, cifar.train_x[:128], cifar.train_y[:128], cifar.mean, cifar.std)
    assert surf.loss[1, 1] == pytest.approx(centre.loss, rel=1e-4)
