"""Image data a user may hand kdprobe by mistake or by bad luck: every pixel mode read as the file holds it
(checked against numpy on the raw values) or refused by name; decompression bombs, FIFOs, empty or linked
class folders refused in one line; a cache keyed on content (a replaced archive or image is never served
stale); archive extraction under a cap; `kdprobe cache list|clear`."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import kdprobe.data.datasets as kd
from cli.main import app
from kdprobe.data.cache import entry_lock, list_cache
from kdprobe.data.datasets import load_dataset
from kdprobe.errors import KdprobeError
from kdprobe.data.images import MAX_PIXELS, decode_image

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch, _isolated_cache):  # after conftest's cache fixture, so this one wins
    monkeypatch.setenv("KDPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KDPROBE_EXTRACT_LIMIT", raising=False)
    return tmp_path / "cache"


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r, expected: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and "internal error" not in r.stderr
    assert expected in lines[0], lines[0]
    return lines[0]


def _hashes(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink()
            else "other" for p in sorted(d.rglob("*"))}


def _png(path: Path, width: int, height: int, depth: int, colour: int, raw: bytes | None = None) -> None:
    """A PNG written by hand (so 16-bit colour and absurd declared sizes can be made): IHDR, one IDAT
    of `raw` (rows with filter byte 0 prepended) or of nothing, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw or b""))
                     + chunk(b"IEND", b""))


def _rows(a: np.ndarray) -> bytes:
    """Big-endian rows with filter byte 0, as PNG stores them."""
    a = a.astype(">u2") if a.dtype == np.uint16 else a
    flat = a.reshape(a.shape[0], -1).view(np.uint8).reshape(a.shape[0], -1)
    return b"".join(b"\x00" + row.tobytes() for row in flat)


def _folder(root: Path, save, classes=("a", "b"), n_train=2, n_test=1) -> dict:
    """root/{train,test}/<class>/<i>.png written by save(path, seed); returns {relative path: expected HWC}."""
    expected = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                p = root / split / c / f"{i}.png"
                expected[f"{split}/{c}/{i}.png"] = save(p, len(expected))
    return expected


def _served(d, root: Path, expected: dict) -> None:
    """Every expected image is served exactly once, with its folder's label."""
    for rel, want in expected.items():
        split, cls = rel.split("/")[:2]
        x, y = d.split(split)
        want_t = torch.from_numpy(np.array(want)).permute(2, 0, 1)
        hits = [j for j in range(len(y)) if torch.equal(x[j], want_t)]
        assert len(hits) == 1, (rel, len(hits))
        assert d.classes[int(y[hits[0]])] == cls


# ---- pixel modes, each against numpy on the raw values ----

def _save_16bit_gray(p, seed):
    raw = np.random.default_rng(seed).integers(0, 65536, (6, 5), dtype=np.uint16)
    raw[0, :5] = [0, 255, 256, 65535, 257 * 200]  # the edges of the scaling
    Image.fromarray(raw).save(p)
    assert Image.open(p).mode == "I;16"  # the file really is 16-bit
    return (raw >> 8).astype(np.uint8)[:, :, None]


def _save_16bit_rgb(p, seed):
    raw = np.random.default_rng(seed).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    _png(p, 5, 6, 16, 2, _rows(raw))
    return (raw >> 8).astype(np.uint8)


def _save_palette(p, seed):
    g = np.random.default_rng(seed)
    palette = g.integers(0, 256, (4, 3), dtype=np.uint8)
    idx = g.integers(0, 4, (6, 5), dtype=np.uint8)
    im = Image.frombytes("P", (5, 6), idx.tobytes())
    im.putpalette(palette.flatten().tolist())
    im.save(p, transparency=0)  # a transparent palette entry: dropped, not a warning
    return palette[idx]


def _save_la(p, seed):
    a = np.random.default_rng(seed).integers(0, 256, (6, 5, 2), dtype=np.uint8)
    Image.frombytes("LA", (5, 6), a.tobytes()).save(p)
    return a[:, :, :1]


def _save_rgba(p, seed):
    a = np.random.default_rng(seed).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    a[0, 0, 3] = 0  # a fully transparent pixel keeps its stored colour
    Image.frombytes("RGBA", (5, 6), a.tobytes()).save(p)
    return a[:, :, :3]


def _save_bilevel(p, seed):
    a = np.random.default_rng(seed).integers(0, 2, (6, 5)).astype(bool)
    Image.fromarray(a).save(p)
    return (a.astype(np.uint8) * 255)[:, :, None]


def _save_gray(p, seed):
    a = np.random.default_rng(seed).integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(a).save(p)
    return a[:, :, None]


def _save_cmyk(p, seed):
    a = np.random.default_rng(seed).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.frombytes("CMYK", (5, 6), a.tobytes()).save(p, format="JPEG", quality=95)
    c, m, y, k = (np.asarray(Image.open(p)).astype(np.float64)[:, :, i] for i in range(4))  # the stored CMYK
    return np.stack([(255 - v) * (255 - k) / 255 for v in (c, m, y)], axis=2)  # float: compared within 1


MODES = {"16-bit gray": _save_16bit_gray, "16-bit RGB": _save_16bit_rgb, "palette": _save_palette,
         "LA": _save_la, "RGBA": _save_rgba, "1-bit": _save_bilevel, "L": _save_gray, "CMYK": _save_cmyk}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_pixel_mode_decodes_to_what_the_file_holds(tmp_path, mode):
    expected = _folder(tmp_path / "f", MODES[mode])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning reaches the user's terminal
        d = load_dataset(f"imagefolder:{tmp_path / 'f'}")
    if mode == "CMYK":  # Pillow's integer arithmetic: within 1 of the exact formula
        for rel, want in expected.items():
            got = np.asarray(Image.open(tmp_path / "f" / rel).convert("RGB"))  # what kdprobe must have served
            assert np.abs(got - want).max() <= 1
            expected[rel] = got
    _served(d, tmp_path / "f", expected)
    assert d.in_channels == next(iter(expected.values())).shape[2]


def test_16bit_png_is_not_clipped_to_black_and_white(tmp_path):
    # the issue: a folder of 16-bit PNGs trained on 0/255 in three channels
    expected = _folder(tmp_path / "f", _save_16bit_gray)
    d = load_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert d.in_channels == 1 and len(d.train_x.unique()) > 50  # not just 0 and 255
    assert sorted(d.train_x.unique().tolist()) == sorted(np.unique(np.concatenate(
        [v for k, v in expected.items() if k.startswith("train")], axis=None)).tolist())


def _tiff(a: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a)
    assert im.mode == mode
    im.save(buf, format="TIFF")
    return buf.getvalue()


def test_32bit_integer_pixels_scale_as_16bit_or_are_refused():
    a = np.array([[0, 255, 256, 65535]], dtype=np.int32)
    got = decode_image(Path("x.png"), _tiff(a, "I"))
    assert got[:, :, 0].tolist() == [[0, 0, 1, 255]]  # v >> 8
    with pytest.raises(KdprobeError, match=r"x\.png holds 32-bit integer pixels \(0\.\.70000\)"):
        decode_image(Path("x.png"), _tiff(np.array([[0, 70000]], dtype=np.int32), "I"))


def test_float_pixels_are_refused_by_name(tmp_path):
    _folder(tmp_path / "f", _save_gray)
    (tmp_path / "f" / "train" / "a" / "0.png").write_bytes(_tiff(np.full((6, 5), 0.5, np.float32), "F"))
    with pytest.raises(KdprobeError, match=r"train/a/0\.png has 32-bit float pixels.*save it as an 8-bit") as e:
        load_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert "\n" not in str(e.value)


def test_grayscale_and_colour_mixed_says_so(tmp_path):
    _folder(tmp_path / "f", _save_gray)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "f" / "train" / "b" / "1.png")
    with pytest.raises(KdprobeError, match=r"b/1\.png is colour \(3 channels\) but .* is grayscale"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}")


def test_a_folder_too_big_for_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    _folder(tmp_path / "f", _save_gray)
    monkeypatch.setattr(kd, "_available_memory", lambda: 100)  # bytes: less than 4 train images of 6x5x1
    with pytest.raises(KdprobeError, match=r"4 images of 5x6x1 \(as .*\) need 120 B of memory, more than the 100 B "):
        load_dataset(f"imagefolder:{tmp_path / 'f'}")
    monkeypatch.setattr(kd, "_available_memory", lambda: 120)  # exactly 4 x 30 bytes fits
    assert load_dataset(f"imagefolder:{tmp_path / 'f'}").train_x.shape == (4, 1, 6, 5)


# ---- files that must not be read ----

def _timeout(signum, frame):
    raise TimeoutError("blocked for 30 s")


@pytest.mark.parametrize("w, h", [(100_000, 100_000), (9000, 9000)])  # Pillow's own bomb check; kdprobe's cap below it
def test_decompression_bomb_is_refused_before_decoding(tmp_path, w, h):
    _folder(tmp_path / "f", _save_gray)
    bomb = tmp_path / "f" / "train" / "b" / "0.png"
    _png(bomb, w, h, 8, 2)  # a few dozen bytes declaring w x h RGB pixels
    assert bomb.stat().st_size < 100 and w * h > MAX_PIXELS
    with pytest.raises(KdprobeError, match=rf"image {bomb} declares {w * h:,} pixels.*refused before decoding"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}")


def test_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    _folder(tmp_path / "f", _save_gray)
    os.mkfifo(tmp_path / "f" / "train" / "a" / "x.png")
    before = _hashes(tmp_path / "f")
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(30)
    try:
        r = _invoke("train", "--dataset", f"imagefolder:{tmp_path / 'f'}", "--out", tmp_path / "f" / "n.pt")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    _one_line_error(r, f"{tmp_path / 'f' / 'train' / 'a' / 'x.png'} is a FIFO (named pipe), not a regular file")
    assert _hashes(tmp_path / "f") == before


def test_a_fifo_swapped_in_after_the_listing_does_not_block(tmp_path):
    from kdprobe.data.images import read_image_bytes

    os.mkfifo(tmp_path / "late.png")
    with pytest.raises(KdprobeError, match="is a FIFO"):
        read_image_bytes(tmp_path / "late.png")


# ---- class folders ----

def _bad_folder(tmp_path, damage) -> tuple[Path, str]:
    root = tmp_path / "f"
    _folder(root, _save_gray, classes=("a", "b", "c"))
    if damage == "empty class":
        for p in (root / "train" / "c").iterdir():
            p.unlink()
        return root, f"class folder {root / 'train' / 'c'} has no .jpg/.png images; every class needs images"
    if damage == "class only in test":
        for p in (root / "train" / "c").iterdir():
            p.unlink()
        (root / "train" / "c" / "notes.txt").write_text("todo\n")
        return root, f"{root / 'train' / 'c'} has no .jpg/.png images (only 1 other file)"
    if damage == "class missing in test":
        for p in (root / "test" / "c").iterdir():
            p.unlink()
        (root / "test" / "c").rmdir()
        return root, "(c only in train/)"
    if damage == "symlinked class":
        for p in (root / "train" / "c").iterdir():
            p.unlink()
        (root / "train" / "c").rmdir()
        (root / "train" / "c").symlink_to(root / "train" / "a")
        return root, "are the same folder (one is a link to the other), so its images would carry two labels"
    if damage == "hard-linked image":
        os.link(root / "train" / "a" / "0.png", root / "train" / "b" / "9.png")
        return root, "are the same file (linked), so one image would carry two labels (a and b)"
    if damage == "test image linked from train":
        (root / "test" / "b" / "7.png").symlink_to(root / "train" / "b" / "1.png")
        return root, "the test split would measure an image the model trained on"
    raise AssertionError(damage)


DAMAGES = ["empty class", "class only in test", "class missing in test", "symlinked class", "hard-linked image",
           "test image linked from train"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_class_folder_mistakes_are_refused_in_one_line(tmp_path, damage):
    root, expected = _bad_folder(tmp_path, damage)
    with pytest.raises(KdprobeError) as e:
        load_dataset(f"imagefolder:{root}")
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["symlinked class", "empty class"])
def test_class_folder_mistakes_through_the_cli_touch_nothing(tmp_path, damage):
    root, expected = _bad_folder(tmp_path, damage)
    before = _hashes(root)
    r = _invoke("train", "--dataset", f"imagefolder:{root}", "--out", root / "n.pt")
    _one_line_error(r, expected)
    assert _hashes(root) == before


# ---- the cache is keyed on content ----

def _solid(p, value):
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(p)


def _archive(tmp_path, path: Path, value: int) -> dict:
    """An uncompressed tar of an image folder whose every pixel is `value` (its size does not depend on value)."""
    src = tmp_path / f"src{value}"
    _folder(src, lambda p, i: _solid(p, value) or np.full((4, 4, 3), value, np.uint8))
    with tarfile.open(path, "w") as tf:
        tf.add(src, arcname="data")
    return {"value": value}


def test_an_archive_replaced_by_one_of_the_same_size_and_time_is_read_anew(tmp_path, own_cache, monkeypatch):
    arc = tmp_path / "data.tar"
    _archive(tmp_path, arc, 10)
    first = load_dataset(f"imagefolder:{arc}")
    assert first.train_x.unique().tolist() == [10]
    st = arc.stat()
    other = tmp_path / "other.tar"
    _archive(tmp_path, other, 200)
    arc.write_bytes(other.read_bytes())  # in place: same inode
    os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (arc.stat().st_size, arc.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    warm = load_dataset(f"imagefolder:{arc}")
    assert warm.train_x.unique().tolist() == [200] and warm.test_x.unique().tolist() == [200]
    monkeypatch.setenv("KDPROBE_CACHE", str(tmp_path / "cold-cache"))
    cold = load_dataset(f"imagefolder:{arc}")
    assert warm.fingerprint == cold.fingerprint != first.fingerprint  # fingerprint of the data as it now is


@pytest.mark.parametrize("byte_check", [True, False])
def test_an_image_rewritten_with_its_old_size_and_time_is_decoded_again(tmp_path, monkeypatch, byte_check):
    if not byte_check:  # the stat key alone (inode, ctime) must catch it, as for files changed long ago
        monkeypatch.setattr(kd, "RACY_NS", 0)
    root = tmp_path / "f"
    _folder(root, lambda p, i: _solid(p, 10 + i) or np.full((4, 4, 3), 10 + i, np.uint8))
    load_dataset(f"imagefolder:{root}")
    p = root / "train" / "a" / "0.png"
    st = p.stat()
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 250, np.uint8)).save(buf, format="PNG")
    assert len(buf.getvalue()) == st.st_size
    p.write_bytes(buf.getvalue())
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    d = load_dataset(f"imagefolder:{root}")
    assert 250 in d.train_x.unique().tolist() and 10 not in d.train_x.unique().tolist()


def _coarse_stat(real_stat, tick_ns):
    """os.stat as on a file system whose ctime ticks every tick_ns (a change within one tick keeps its ctime)."""
    def stat(path, *a, **k):
        s = real_stat(path, *a, **k)
        extra = {n: getattr(s, n) for n in dir(s) if n.startswith("st_")}
        extra["st_ctime_ns"] = s.st_ctime_ns // tick_ns * tick_ns
        extra["st_mtime_ns"] = s.st_mtime_ns // tick_ns * tick_ns
        return os.stat_result(tuple(s), extra)
    return stat


def test_a_change_within_one_timestamp_tick_is_still_seen(tmp_path, monkeypatch):
    # git's "racy" files: rewritten in place within the same ctime tick, size and mtime equal, the stat key
    # cannot tell. The cache keeps the files' byte digest while they are that fresh and checks it on use.
    import time

    monkeypatch.setattr(kd.os, "stat", _coarse_stat(os.stat, 1_000_000_000))
    while time.time() % 1 > 0.05:  # start just after a tick, so that the whole test fits in one
        time.sleep(0.01)
    root = tmp_path / "f"
    _folder(root, lambda p, i: _solid(p, 10 + i) or None)
    first = load_dataset(f"imagefolder:{root}")
    p = root / "train" / "a" / "0.png"
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 250, np.uint8)).save(buf, format="PNG")
    key_before = os.stat(p)
    p.write_bytes(buf.getvalue())
    if os.stat(p).st_ctime_ns != key_before.st_ctime_ns:
        pytest.skip("the rewrite crossed a tick boundary; the stat key alone caught it")
    d = load_dataset(f"imagefolder:{root}")
    assert 250 in d.train_x.unique().tolist() and d.fingerprint != first.fingerprint


def test_older_files_are_trusted_by_their_stat_key(tmp_path, monkeypatch):
    root = tmp_path / "f"
    _folder(root, lambda p, i: _solid(p, 10 + i) or None)
    monkeypatch.setattr(kd, "RACY_NS", 0)  # as if the files had last changed long ago: no byte check needed
    load_dataset(f"imagefolder:{root}")
    monkeypatch.setattr(kd, "_files_digest", lambda files: (_ for _ in ()).throw(AssertionError("re-read")))
    monkeypatch.setattr(kd, "_decode", lambda files: (_ for _ in ()).throw(AssertionError("decoded again")))
    assert load_dataset(f"imagefolder:{root}").train_x.shape[0] == 4


# ---- extraction under a cap ----

def _zeros_archive(path: Path, big: int, extra_images: Path | None = None, tail: int = 0) -> None:
    """A .tar.gz holding one member of `big` zero bytes (it compresses ~1000x), optionally an image folder
    before it and `tail` small members after it."""
    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(path, "w:gz") as tf:
        if extra_images is not None:
            tf.add(extra_images, arcname="data")
        info = tarfile.TarInfo("data/padding.bin")
        info.size = big
        tf.addfile(info, io.BufferedReader(Zeros(big)))
        for i in range(tail):
            info = tarfile.TarInfo(f"data/tail{i}.bin")
            info.size = 10
            tf.addfile(info, io.BytesIO(bytes(10)))


def test_an_archive_over_the_extraction_cap_is_refused_before_writing(tmp_path, own_cache, monkeypatch):
    src = tmp_path / "src"
    expected = _folder(src, _save_gray)
    arc = tmp_path / "bomb.tar.gz"
    _zeros_archive(arc, 64 << 20, src)
    assert arc.stat().st_size < 1 << 20  # 64 MiB from well under one
    monkeypatch.setenv("KDPROBE_EXTRACT_LIMIT", "16M")
    r = _invoke("train", "--dataset", f"imagefolder:{arc}", "--out", tmp_path / "n.pt")
    line = _one_line_error(r, f"archive {arc} (")
    assert "would extract more than the extraction cap of 16.0 MiB: 64.1 MiB in its first" in line
    assert "counted from its headers, before extracting" in line and "KDPROBE_EXTRACT_LIMIT=1G" in line
    assert not (own_cache / "extracted").exists() or not any((own_cache / "extracted").iterdir())
    monkeypatch.setenv("KDPROBE_EXTRACT_LIMIT", "1G")  # what the message says to do
    _served(load_dataset(f"imagefolder:{arc}"), src, expected)


def test_a_bad_extraction_limit_is_one_line(tmp_path, monkeypatch):
    arc = tmp_path / "a.tar"
    _archive(tmp_path, arc, 3)
    monkeypatch.setenv("KDPROBE_EXTRACT_LIMIT", "lots")
    with pytest.raises(KdprobeError, match="expected KDPROBE_EXTRACT_LIMIT to be a size in bytes such as 20G"):
        load_dataset(f"imagefolder:{arc}")


def test_the_disk_filling_up_while_extracting_stops_the_extraction(tmp_path, own_cache, monkeypatch):
    import kdprobe.data.archives as kc

    arc = tmp_path / "big.tar.gz"
    _zeros_archive(arc, 80 << 20, tail=2)
    real_free, calls = kc._free, []

    def free(folder):  # plenty before extracting; 100 MiB once extraction has begun (someone else filled it)
        calls.append(folder)
        return real_free(folder) if len(calls) == 1 else 100 << 20

    monkeypatch.setattr(kc, "_free", free)
    with pytest.raises(KdprobeError, match=r"needs .* more but .* free \(while extracting\)"):
        with kc.extracted(arc):
            pass
    assert not list((own_cache / "extracted").iterdir())  # the partial copy is gone


def test_an_archive_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "data.tar.gz")
    with pytest.raises(KdprobeError, match=r"data\.tar\.gz is a FIFO \(named pipe\); pass a folder"):
        load_dataset(f"imagefolder:{tmp_path / 'data.tar.gz'}")


# ---- kdprobe cache list | clear ----

@pytest.fixture
def filled(tmp_path, own_cache):
    """A cache holding one extracted archive (and its decoded images) and one decoded folder."""
    arc = tmp_path / "data.tar"
    _archive(tmp_path, arc, 7)
    load_dataset(f"imagefolder:{arc}")
    folder = tmp_path / "f"
    _folder(folder, _save_gray)
    load_dataset(f"imagefolder:{folder}")
    names = {e.name: e for e in list_cache().entries}
    ext = next(n for n in names if n.startswith("extracted/"))
    dec = [n for n in names if n.startswith("imagefolder/")]
    assert len(names) == 3 and len(dec) == 2
    return {"arc": arc, "folder": folder, "extracted": ext, "decoded": dec}


def _du(paths) -> int:
    total = 0
    for p in paths:
        total += os.lstat(p).st_size
        if p.is_dir() and not p.is_symlink():
            total += sum(os.lstat(q).st_size for q in p.rglob("*"))
    return total


def test_cache_list_shows_each_entry_its_source_and_size(filled, own_cache):
    listing = list_cache()
    by_name = {e.name: e for e in listing.entries}
    ext = by_name[filled["extracted"]]
    assert ext.kind == "extracted archive" and ext.source == str(filled["arc"].resolve())
    assert ext.name == "extracted/" + hashlib.sha256(filled["arc"].read_bytes()).hexdigest()[:16]
    assert ext.bytes == _du([own_cache / ext.name])
    sources = sorted(by_name[n].source for n in filled["decoded"])
    assert sources == sorted([f"imagefolder:{filled['arc'].resolve()}", f"imagefolder:{filled['folder'].resolve()}"])
    assert listing.bytes == sum(_du(e.paths) for e in listing.entries)
    r = _invoke("cache", "list")
    assert r.exit_code == 0, r.output
    assert filled["extracted"] in r.stdout and str(filled["arc"].resolve()) in r.stdout
    assert "3 entries" in r.stdout.splitlines()[-1]


def test_cache_clear_removes_the_named_entry_only(filled, own_cache):
    r = _invoke("cache", "clear", filled["extracted"])
    assert r.exit_code == 0, r.output
    names = {e.name for e in list_cache().entries}
    assert names == set(filled["decoded"]) and not (own_cache / filled["extracted"]).exists()
    d = load_dataset(f"imagefolder:{filled['arc']}")  # rebuilt on the next use
    assert d.train_x.unique().tolist() == [7]


@pytest.mark.parametrize("args, expected", [
    (["nosuch"], "no cache entry named 'nosuch'"),
    ([], "name the cache entries to remove"),
    (["--all", "x"], "or pass --all, not both"),
])
def test_cache_clear_mistakes_remove_nothing(filled, own_cache, args, expected):
    before = _hashes(own_cache)
    _one_line_error(_invoke("cache", "clear", *args), expected)
    assert _hashes(own_cache) == before


def test_cache_clear_never_removes_an_entry_in_use(filled, own_cache):
    before = _hashes(own_cache)
    with entry_lock(filled["extracted"]) as held:  # another process reading it (a second open file: flock conflicts)
        assert held
        _one_line_error(_invoke("cache", "clear", filled["extracted"], filled["decoded"][0]), "is in use")
        assert _hashes(own_cache) == before  # refused: the free one named with it is kept too
        r = _invoke("cache", "clear", "--all")
        assert r.exit_code == 0, r.output
        assert f"kept {filled['extracted']}: in use" in r.stdout
        assert {e.name for e in list_cache().entries} == {filled["extracted"]}
        assert (own_cache / filled["extracted"] / ".complete").is_file()


def test_cache_clear_never_follows_links_out_of_the_cache(filled, own_cache, tmp_path):
    outside = tmp_path / "precious"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("mine\n")
    (own_cache / filled["extracted"] / "link").symlink_to(outside)  # a link inside an entry
    fake = own_cache / "extracted" / ("ab" * 8)
    fake.symlink_to(outside)  # an entry that is itself a link
    (own_cache / "notes.txt").write_text("not kdprobe's\n")  # not an entry: left alone
    (own_cache / "imagefolder" / "mine.pt").write_text("not kdprobe's naming\n")
    r = _invoke("cache", "clear", "--all")
    assert r.exit_code == 0, r.output
    assert (outside / "sub" / "keep.txt").read_text() == "mine\n"
    assert not fake.is_symlink() and not (own_cache / filled["extracted"]).exists()
    assert (own_cache / "notes.txt").exists() and (own_cache / "imagefolder" / "mine.pt").exists()
    assert list_cache().entries == ()


def test_an_unfinished_extraction_is_listed_and_kept_while_its_extractor_lives(filled, own_cache):
    tmp = own_cache / "extracted" / ("cd" * 8 + ".tmp999999")
    (tmp / "data").mkdir(parents=True)
    name = "extracted/" + "cd" * 8
    with entry_lock(name, exclusive=True):  # the extracting process holds the entry
        assert {e.name: e.kind for e in list_cache().entries}[name] == "extraction (unfinished)"
        r = _invoke("cache", "clear", "--all")
        assert r.exit_code == 0 and tmp.is_dir()
    r = _invoke("cache", "clear", name)  # its extractor is gone (killed): the leftover goes
    assert r.exit_code == 0, r.output
    assert not tmp.exists()
