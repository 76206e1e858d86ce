"""Checks on what a command reads, before any work: does a checkpoint fit its data, and are
the checkpoints of a group really different models?

`check_model_data` is the one place that decides whether a model may run on a dataset. It is
used by every probe command (eval, landscape, interpolate, diversity, ...) and by training
(the teacher and the --init checkpoint against the student's data). It compares, naming both
sides in the message:
  * the input shape (channels, height, width) the checkpoint records against the images';
  * the number of classes the model predicts against the dataset's;
  * the dataset identity: the content fingerprint the checkpoint records
    (`meta["data_fingerprint"]`, see kdprobe.data.datasets) against the loaded data's. When the command
    took the dataset from the checkpoint (`explicit=False`), other data under the recorded name
    is refused; with an explicit --dataset it is allowed and a note says so. Checkpoints written
    before fingerprints existed (and foreign ones) have none and are not refused for it;
  * finally one forward pass on one sample, which is all a foreign checkpoint (no recorded
    shape) can be checked with; its failure is reported as a message, not a traceback.
Before comparing, the model is fitted to the data (kdprobe.data.preprocess.fit_input): the image size
it takes (--image-size, its checkpoint's record, or its family's default, e.g. 224 for
torchvision models) and the normalization it was trained with are applied to every batch it
receives by an input hook, so the shape compared is the one the model will actually see.
`require_distinct` refuses byte-identical copies of one checkpoint among a group's members.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from kdprobe.data.datasets import TensorData
from kdprobe.errors import KdprobeError
from kdprobe.data.preprocess import fit_input

_BUILTIN = ("digits", "cifar10", "cifar100")


def _shape_text(shape) -> str:
    c, h, w = shape
    return f"{c}-channel {h}x{w}"


def recorded_shape(meta: dict) -> tuple[int, int, int] | None:
    """The (C, H, W) input shape a checkpoint records, or None when it records none (or junk)."""
    s = (meta or {}).get("input_shape")
    if isinstance(s, (list, tuple)) and len(s) == 3 and all(type(v) is int and v > 0 for v in s):
        return tuple(s)
    return None


def _model_classes(model) -> int | None:
    n = (getattr(model, "arch", None) or {}).get("kwargs", {}).get("num_classes")
    return n if type(n) is int else None


def same_data(meta_a: dict, meta_b: dict) -> bool | None:
    """Whether two checkpoints were trained on the same data: True/False, or None when unknown."""
    fa, fb = (meta_a or {}).get("data_fingerprint"), (meta_b or {}).get("data_fingerprint")
    if fa and fb:
        return fa == fb
    na, nb = (meta_a or {}).get("dataset"), (meta_b or {}).get("dataset")
    if na in _BUILTIN and nb in _BUILTIN:  # names without a path mean one thing everywhere
        return na == nb
    return None


def _forward_one(ck, data: TensorData, who: str, shape: tuple) -> int:
    """Run one test sample through the model (eval mode, no grad, mode restored); returns the logit count.
    shape: what the model receives (after its input hook)."""
    model = ck.model
    x, _ = data.head("test", 1)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = x.device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except Exception as e:  # noqa: BLE001 - any failure of a foreign forward is the user's mismatch
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KdprobeError(f"{who} cannot take {data.name}'s images as {_shape_text(shape)} inputs: a forward pass on "
                           f"one sample failed ({why}); pass the --dataset it was trained on (or the right --arch, "
                           "or --image-size)") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise KdprobeError(f"{who} returns {got} for one {_shape_text(shape)} image, expected (1, classes); "
                           "pass a classifier checkpoint")
    return int(out.shape[1])


def check_model_data(ck, data: TensorData, *, explicit: bool, role: str = "checkpoint",
                     image_size: int | None = None) -> str | None:
    """Fit a checkpoint (kdprobe.checkpoints.format.LoadedCheckpoint) to `data` and refuse it if it does not fit;
    returns a note or None.

    explicit: the user named the dataset (--dataset), so data other than the recorded one is
    allowed (returned as a note); otherwise it is refused. role: 'checkpoint', 'teacher' or
    'init' (training refuses other data for a teacher or an init checkpoint, with no override).
    image_size: the command's --image-size (None: the checkpoint's or the family's; 0: native).
    """
    meta = ck.meta if isinstance(ck.meta, dict) else {}
    who = f"{role} {ck.path}" if role != "checkpoint" else str(ck.path)
    recorded = meta.get("dataset")
    trained_on = f"trained on {recorded}" if recorded else "a foreign checkpoint"
    stored = tuple(int(v) for v in data.test_x.shape[1:])
    if len(stored) != 3:
        raise KdprobeError(f"expected images of shape (C, H, W) in {data.name}, got {stored}; use an image dataset")
    fit = fit_input(ck.model, meta, data, image_size)
    have = fit.shape
    served = (f"{data.name} has {_shape_text(have)} images" if fit.size is None else
              f"{data.name}'s images are served at {_shape_text(have)} (image size {fit.size} from {fit.source})")
    fix = ("use a teacher trained on this dataset" if role == "teacher" else
           "use an --init checkpoint of this dataset" if role == "init" else
           f"pass the --dataset it was trained on{f' ({recorded})' if recorded else ''}")
    want = recorded_shape(meta)
    if want is not None and want != have:
        hint = f"pass --image-size {want[1]}" if want[0] == have[0] and want[1] == want[2] else fix
        raise KdprobeError(f"{who} takes {_shape_text(want)} inputs ({trained_on}), but {served}; {hint}")
    n = _model_classes(ck.model)
    if n is not None and n != data.num_classes:
        raise KdprobeError(f"{who} predicts {n} classes ({trained_on}), but {data.name} has {data.num_classes}; {fix}")
    n_out = _forward_one(ck, data, who, have)
    if n_out != data.num_classes:
        raise KdprobeError(f"{who} predicts {n_out} classes ({trained_on}), but {data.name} has {data.num_classes}; "
                           f"{fix}")
    fp, have_fp = meta.get("data_fingerprint"), data.fingerprint
    if fp and have_fp:
        differs = fp != have_fp
    elif recorded in _BUILTIN and data.name in _BUILTIN:
        differs = recorded != data.name
    else:  # nothing recorded to compare (older or foreign checkpoint): shapes and classes were all we had
        return None
    if not differs:
        return None
    sides = (f"{who} was trained on {recorded}" + (f" (data fingerprint {fp[:12]})" if fp else "")
             + f", but {data.name} holds other data" + (f" (fingerprint {have_fp[:12]})" if have_fp else ""))
    if role in ("teacher", "init"):
        raise KdprobeError(f"{sides}; {fix}")
    if not explicit:
        raise KdprobeError(f"{sides}; pass --dataset {data.name} to use it anyway, or point the checkpoint's "
                           f"dataset at the original data (--data-dir)")
    return f"note: {sides}; using it because --dataset was given"


def require_distinct(checkpoints: Iterable, what: str = "models") -> None:
    """Refuse byte-identical checkpoints (equal sha256) among items with .path and .sha256: one model
    counted twice would shrink every spread and inflate n."""
    seen: dict[str, Path] = {}
    for ck in checkpoints:
        first = seen.setdefault(ck.sha256, ck.path)
        if first != ck.path:
            raise KdprobeError(f"{first} and {ck.path} are byte-identical (sha256 {ck.sha256[:12]}): one checkpoint "
                               f"would count as two independent {what}; pass each trained model once")

