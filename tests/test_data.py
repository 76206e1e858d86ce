import pytest
import torch

from kdprobe.data.datasets import load_dataset, normalize
from kdprobe.errors import KdprobeError


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (1, 8, 8)
    assert len(a.train_y) + len(a.test_y) == 1797 and len(a.test_y) == 359
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.num_classes == 10 and a.train_x.max() == 255
    # no test image is also a train image with the same label (the split is by index)
    from sklearn.datasets import load_digits
    assert len(load_digits().target) == 1797


def test_normalize_matches_manual_formula():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    out = normalize(x, (0.2,), (0.5,))
    expect = (x.double() / 255 - 0.2) / 0.5
    assert torch.allclose(out.double(), expect, atol=1e-6)


def test_imagefolder_reads_and_caches(tiny_imagefolder, monkeypatch):
    d = load_dataset(f"imagefolder:{tiny_imagefolder}")
    assert d.classes == ("cat", "dog", "emu")
    assert d.train_x.shape == (18, 3, 8, 8) and d.test_x.shape == (6, 3, 8, 8)
    assert sorted(d.train_y.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert d.train_y[:6].unique().numel() > 1  # served shuffled, not class by class
    import numpy as np
    from PIL import Image
    for cls_i, cls in enumerate(d.classes):  # every file is there, with its label
        for i in range(6):
            img = torch.as_tensor(np.array(Image.open(tiny_imagefolder / "train" / cls / f"{i}.png"))).permute(2, 0, 1)
            hits = [j for j in range(18) if torch.equal(d.train_x[j], img)]
            assert len(hits) == 1 and d.train_y[hits[0]] == cls_i
    # the second load comes from the cache: decoding is not called again
    import kdprobe.data.datasets as kd
    monkeypatch.setattr(kd, "_decode", lambda files: (_ for _ in ()).throw(AssertionError("decoded again")))
    d2 = load_dataset(f"imagefolder:{tiny_imagefolder}")
    assert torch.equal(d2.train_x, d.train_x)


def test_imagefolder_tarball(tiny_imagefolder, tmp_path):
    import tarfile
    arc = tmp_path / "f.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(tiny_imagefolder, arcname="folder")
    d = load_dataset(f"imagefolder:{arc}")
    assert d.train_x.shape == (18, 3, 8, 8)


def test_bad_dataset_names_are_clear(tmp_path):
    with pytest.raises(KdprobeError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(KdprobeError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(KdprobeError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(KdprobeError, match="not found"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_binary_format(tmp_path):
    """torchvision's CIFAR-10 layout, built by hand (tiny), loads as uint8 NCHW."""
    import pickle, hashlib
    import numpy as np
    import torchvision
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.RandomState(0)
    data = rng.randint(0, 256, (4, 3072), dtype=np.uint8)

    for name, _ in torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list:
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    # torchvision checks md5 sums; patch the expected ones to our files
    cls = torchvision.datasets.CIFAR10
    md5 = lambda p: hashlib.md5(open(p, "rb").read()).hexdigest()
    orig = (cls.train_list, cls.test_list, cls.meta)
    try:
        cls.train_list = [[n, md5(base / n)] for n, _ in orig[0]]
        cls.test_list = [[n, md5(base / n)] for n, _ in orig[1]]
        cls.meta = dict(orig[2], md5=md5(base / "batches.meta"))
        d = load_dataset("cifar10", tmp_path)
    finally:
        cls.train_list, cls.test_list, cls.meta = orig
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert torch.equal(d.train_x[0], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert d.mean[0] == pytest.approx(0.4914)


# ---- issue 10 item 12: one-line errors and a cache that heals ----

def test_a_file_that_is_not_a_tar_archive_is_one_line(tmp_path):
    p = tmp_path / "images.tar.gz"
    p.write_bytes(b"this is not an archive\n" * 10)
    with pytest.raises(KdprobeError, match=r"is a file but not a readable tar archive .*pass a folder") as e:
        load_dataset(f"imagefolder:{p}")
    assert "\n" not in str(e.value)
    import tarfile  # a truncated .tar.gz is refused the same way, and leaves no half-extracted folder behind
    from kdprobe.data.datasets import cache_dir

    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        for i in range(50):
            f = tmp_path / f"x{i}.bin"
            f.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
            tf.add(f, arcname=f"folder/train/a/{i}.bin")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(KdprobeError, match="not a readable tar archive"):
        load_dataset(f"imagefolder:{cut}")
    assert not list((cache_dir() / "extracted").glob("*.tmp*"))


def test_two_runs_extracting_one_archive_never_delete_the_copy_the_other_reads(tmp_path):
    # Two studies started together both extract the shared archive; the one finishing second used to
    # delete the first one's complete copy while it was being read ("has no test/ subfolder").
    from kdprobe.data.datasets import _publish_extracted

    dest = tmp_path / "key"
    first, second = tmp_path / "key.tmp1", tmp_path / "key.tmp2"
    for d in (first, second):
        (d / "root" / "test").mkdir(parents=True)
        (d / ".complete").touch()
    (first / "root" / "test" / "mine").touch()
    _publish_extracted(first, dest)
    _publish_extracted(second, dest)  # finished later: its copy is dropped, the published one stays
    assert (dest / "root" / "test" / "mine").exists() and not first.exists() and not second.exists()
    incomplete = tmp_path / "half"  # a killed run's incomplete copy is replaced
    (incomplete / "junk").mkdir(parents=True)
    third = tmp_path / "half.tmp3"
    (third / "root").mkdir(parents=True)
    (third / ".complete").touch()
    _publish_extracted(third, incomplete)
    assert (incomplete / ".complete").exists() and not (incomplete / "junk").exists()


def test_download_offline_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(KdprobeError, match=r"could not download cifar10 into .*: \[Errno -3\] Temporary failure.*"
                                           r"check the network") as e:
        load_dataset("cifar10", tmp_path, download=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong content"])
def test_a_corrupt_decode_cache_is_rebuilt(tiny_imagefolder, damage, tmp_path, monkeypatch):
    from kdprobe.data.datasets import cache_dir

    monkeypatch.setenv("KDPROBE_CACHE", str(tmp_path / "own-cache"))
    first = load_dataset(f"imagefolder:{tiny_imagefolder}")
    (cache,) = (cache_dir() / "imagefolder").glob("*.pt")
    blob = cache.read_bytes()
    if damage == "truncated":
        cache.write_bytes(blob[: len(blob) // 3])
    elif damage == "garbage":
        cache.write_bytes(b"\x00garbage" * 100)
    else:  # a readable torch file of the wrong shape (e.g. another folder's cache under this key)
        torch.save({"train_x": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}, cache)
    again = load_dataset(f"imagefolder:{tiny_imagefolder}")
    assert torch.equal(again.train_x, first.train_x) and again.fingerprint == first.fingerprint
    assert torch.load(cache, weights_only=True)["train_x"].shape == (18, 3, 8, 8)  # rewritten whole
