"""One image file -> uint8 pixels (H, W, C): which files and pixel modes are read, and how.

Only regular files are read (a FIFO named x.png would block forever; it is refused by name),
at most MAX_FILE_BYTES each, and only images of at most MAX_PIXELS pixels: the size is read
from the header before any pixel is decoded, so a PNG declaring 100000 x 100000 pixels in a
few hundred bytes is refused instead of allocating 30 GB.

Pixel modes (Pillow's names), each read as what the file holds or refused by name:
  1, L         grayscale, 1 channel (bilevel 1 -> 0 / 255)
  LA           grayscale, 1 channel, alpha dropped
  I;16*, I     16-bit grayscale (16-bit PNGs): v >> 8, the high byte, the same scaling Pillow
               applies to 16-bit colour PNGs, so 65535 -> 255 and 257 * v -> v; an 'I' image
               with values outside 0..65535 (32-bit integers) is refused
  RGB, YCbCr   colour, 3 channels
  RGBA, RGBX   colour, alpha dropped: the colour channels as stored, the same pixels
               torchvision's ImageFolder loader (convert('RGB')) gives
  P, PA        palette indices looked up in the palette -> RGB, transparency dropped
  CMYK         -> RGB by Pillow's conversion, R = (255 - C)(255 - K) / 255 (likewise G, B)
  F and others refused: 32-bit float or other pixels have no agreed scale to 8 bits
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np

from kdprobe.errors import KdprobeError

MAX_PIXELS = 8192 * 8192  # pixels per image (width x height); far above any classifier input
MAX_FILE_BYTES = 256 << 20  # bytes per image file: a 8192 x 8192 RGB PNG stays well under this

_GRAY = {"1", "L"}
_GRAY_ALPHA = {"LA"}
_COLOUR = {"RGB", "YCbCr", "RGBA", "RGBX", "CMYK"}
_PALETTE = {"P", "PA"}


def describe_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a folder', ... for a stat mode that is not a regular file."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def read_image_bytes(path: Path) -> bytes:
    """The bytes of an image file; anything but a regular file of at most MAX_FILE_BYTES is refused by name.
    Opened non-blocking and checked on the open descriptor, so a FIFO swapped in after a listing cannot hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise KdprobeError(f"cannot read image {path}: {(e.strerror or str(e)).lower()}; fix or remove it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KdprobeError(f"image folder entry {path} is {describe_kind(st.st_mode)}, not a regular file; "
                               "only image files are read: remove it")
        if st.st_size > MAX_FILE_BYTES:
            raise KdprobeError(f"image {path} is a {st.st_size / 2**20:,.0f} MiB file (more than "
                               f"{MAX_FILE_BYTES >> 20} MiB); resize it to the size the model takes")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows while it is read
        if len(data) > MAX_FILE_BYTES:
            raise KdprobeError(f"image {path} grew past {MAX_FILE_BYTES >> 20} MiB while it was read; "
                               "let whatever writes it finish, or remove it")
        return data
    finally:
        os.close(fd)


def decode_image(path: Path, data: bytes) -> np.ndarray:
    """Decode one image's bytes into uint8 (H, W, C), C = 1 or 3, by the mode rules of the module docstring."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # our own pixel cap is below Pillow's bomb warning; Pillow's palette notes are not the user's concern
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise KdprobeError(_too_big(path, f"{w * h:,} pixels ({w} x {h})"))
                return _pixels(path, im)
    except KdprobeError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own guard (above 2 x its limit) trips in open()
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise KdprobeError(_too_big(path, f"{int(n.group(1)):,} pixels" if n else "more pixels than Pillow allows")) \
            from None
    except MemoryError:
        raise KdprobeError(f"image {path} does not fit in memory; resize it to the size the model takes") from None
    except Exception as e:  # noqa: BLE001 - a decoder fed arbitrary bytes fails in many ways (OSError,
        # SyntaxError for broken PNG chunks, ValueError, EOFError, zlib.error): each is "this file is bad"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise KdprobeError(f"cannot decode image {path}: {why}; replace or remove the file") from None


def _too_big(path: Path, size: str) -> str:
    return (f"image {path} declares {size}, more than {MAX_PIXELS:,}: refused before decoding (a decompression "
            "bomb or a huge photo); resize it to the size the model takes or remove it")


def _pixels(path: Path, im) -> np.ndarray:
    mode = im.mode
    if mode in _GRAY:
        a = np.asarray(im.convert("L"))
    elif mode in _GRAY_ALPHA:
        a = np.asarray(im)[:, :, 0]
    elif mode.startswith("I;16") or mode == "I":
        v = np.asarray(im).astype(np.int64)  # I;16B and friends come as big-endian uint16: astype normalizes
        if v.size and (v.min() < 0 or v.max() > 65535):
            raise KdprobeError(f"image {path} holds 32-bit integer pixels ({int(v.min())}..{int(v.max())}), "
                               "outside the 16-bit range 0..65535; save it as an 8- or 16-bit PNG")
        a = (v >> 8).astype(np.uint8)
    elif mode in _COLOUR:
        a = np.asarray(im.convert("RGB"))  # RGBA/RGBX: colour channels as stored; CMYK: Pillow's formula
    elif mode in _PALETTE:
        a = np.asarray(im.convert("RGBA"))[:, :, :3]  # palette lookup; via RGBA so transparency is not a warning
    else:
        what = "32-bit float" if mode == "F" else f"mode {mode}"
        raise KdprobeError(f"image {path} has {what} pixels, which kdprobe does not read (no agreed scale to "
                           "8 bits); save it as an 8-bit grayscale or RGB PNG/JPEG")
    return np.array(a[:, :, None] if a.ndim == 2 else a, dtype=np.uint8)  # a writable copy (Pillow's is read-only)

