"""A hostile battery: careless or unlucky command lines, each answered by exactly one line
`error: ...` with exit 1, never an internal error, and no file touched (issue 10).

Every case runs the real `kdprobe` command group in-process on one module-wide folder of tiny
files (a checkpoint made once, a surface and a line .h5 from real runs, malformed checkpoints
written here), and checks the sha256 of every file in that folder before and after.
"""
import hashlib
import os
import random
import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from kdprobe.checkpoints.format import read_payload, save_checkpoint
from kdprobe.models import create_model

META = {"method": "scratch", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0}
GRID = ["--x", "-1:1:2", "--y", "-1:1:2", "--samples", "16", "--device", "cpu", "--precision", "fp32"]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _flip_tensor_bytes(src: Path, dst: Path) -> None:
    """Flip two bytes inside the first tensor record of a torch zip (the CRC no longer matches)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 8)
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[off + 26:off + 30])  # local file header
    start = off + 30 + name_len + extra_len
    data[start] ^= 0xFF
    data[start + 1] ^= 0xFF
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = create_model("resnet8a", num_classes=10, in_channels=1, width=0.25)
    save_checkpoint(d / "a.pt", model, META)
    torch.manual_seed(1)
    save_checkpoint(d / "b.pt", create_model("resnet8a", num_classes=10, in_channels=1, width=0.25), META)
    good = read_payload(d / "a.pt")

    def variant(name, **changes):
        payload = {k: v for k, v in good.items() if changes.get(k, 0) is not ...}
        payload.update({k: v for k, v in changes.items() if v is not ...})
        torch.save(payload, d / name)

    sd = good["state_dict"]
    variant("trained.pt", meta=dict(META, made_by="train", history=[]))
    variant("pruned.pt", meta=dict(META, made_by="prune", pruning={"method": "l1"}))
    variant("arch_str.pt", arch="resnet8a")
    variant("arch_missing.pt", arch=...)
    variant("meta_list.pt", meta=[1, 2])
    variant("meta_none.pt", meta=None)
    variant("version_str.pt", format_version="1")
    variant("sd_list.pt", state_dict=list(sd.values()))
    variant("sd_ints.pt", state_dict={k: 3 for k in sd})
    variant("shape_junk.pt", meta=dict(META, input_shape="8x8"))
    variant("wide.pt", arch={"name": "resnet8a", "kwargs": dict(good["arch"]["kwargs"], width=2000)})
    variant("int_weights.pt", state_dict={k: (v * 100).to(torch.int64) if v.is_floating_point() else v
                                          for k, v in sd.items()})
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(d / "nan.pt", model, META)
    _flip_tensor_bytes(d / "a.pt", d / "flipped.pt")
    (d / "trunc.pt").write_bytes((d / "a.pt").read_bytes()[:600])
    (d / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    os.mkfifo(d / "fifo.pt")
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub").mkdir()
    (d / "a_copy.pt").write_bytes((d / "a.pt").read_bytes())
    for args in (["landscape", d / "a.pt", "--out", d / "s.vtk", *GRID],
                 ["interpolate", d / "a.pt", d / "b.pt", "--out", d / "p.h5", "--steps", "2", *GRID[4:]],
                 ["eval", d / "a.pt", "--csv", d / "e.csv", "--json", d / "e.json"]):
        r = _invoke(*args)
        assert r.exit_code == 0, r.output
    return d


CASES = [
    # bad numbers: ranges declared once (trainers.config.RANGES, registry WIDTH), checked at parse time
    ("train --lr -1 --out {d}/n.pt", "--lr"),
    ("train --lr abc --out {d}/n.pt", "--lr"),
    ("train --weight-decay -1 --out {d}/n.pt", "--weight-decay"),
    ("train --cutmix-beta inf --out {d}/n.pt", "--cutmix-beta"),
    ("train --cutmix-beta nan --out {d}/n.pt", "--cutmix-beta"),
    ("train --width nan --out {d}/n.pt", "--width"),
    ("train --width inf --out {d}/n.pt", "--width"),
    ("train --width 0 --out {d}/n.pt", "--width"),
    ("train --width -1 --out {d}/n.pt", "--width"),
    ("train --train-subset -5 --out {d}/n.pt", "--train-subset"),
    ("train --train-subset 0 --out {d}/n.pt", "--train-subset"),
    ("train --bn-sparsity -1 --out {d}/n.pt", "--bn-sparsity"),
    ("train --bn-sparsity nan --out {d}/n.pt", "--bn-sparsity"),
    ("train --milestones abc --out {d}/n.pt", "--milestones"),
    ("train --milestones -1 --out {d}/n.pt", "--milestones"),
    ("train --seed 18446744073709551616 --out {d}/n.pt", "--seed"),
    ("train --seed -1 --out {d}/n.pt", "--seed"),
    ("train --epochs 0 --out {d}/n.pt", "--epochs"),
    ("train --temperature 0 --out {d}/n.pt", "--temperature"),
    ("train --epochs many --out {d}/n.pt", "--epochs"),
    ("pipeline pruning --out {d}/pp --finetune-epochs 0", "--finetune-epochs"),
    ("pipeline pruning --out {d}/pp --width -1", "--width"),
    ("study demo --out {d}/st --set train.model_kwargs.width=-1", "width"),
    ("study demo --out {d}/st --dataset nosuch", "unknown dataset"),
    ("study demo --out {d}/st --dataset imagefolder:{d}/nope", "does not exist"),
    ("study table6 --out {d}/st --set sharpness.top_k=0", "sharpness.top_k"),
    ("study table6 --out {d}/st --set cka.layer=layer9", "cka.layer"),
    ("study table7 --out {d}/st --set agreement.reference=cutmix --set agreement.methods=[\"scratch\"]",
     "agreement.reference"),
    ("study table6 --out {d}/st --set train.overrides.subset_rule=balanced", "--train-subset"),
    # metadata that would lie
    ("train --teacher {d}/a.pt --out {d}/n.pt", "--distill"),
    ("train --init {d}/a.pt --model resnet8a --out {d}/n.pt", "--model"),
    ("train --init {d}/a.pt --width 0.5 --out {d}/n.pt", "--width"),
    # output paths: folders, collisions, inputs, other kinds of files
    ("train --out {d}/sub", "is a folder"),
    ("train --distill label --teacher {d}/a.pt --out {d}/a.pt --overwrite", "also the input --teacher"),
    ("train --init {d}/a.pt --out {d}/a.pt --overwrite", "also the input --init"),
    ("train --out {d}/x.jsonl", "same file"),
    ("train --out {d}/s.h5 --overwrite", "kdprobe loss surface"),
    ("train --out {d}/e.csv --overwrite", "CSV table"),
    ("landscape {d}/a.pt --out {d}/t.vtk --h5 {d}/t.vtk", "same file"),
    ("landscape {d}/a.pt --out {d}/q.vtk --h5 {d}/b.pt --overwrite", "holds a kdprobe checkpoint"),
    ("landscape {d}/a.pt --out {d}/p.vtk --overwrite", "interpolation path"),
    ("landscape {d}/a.pt --out {d}/q.vtk --directions {d}/s.h5 --h5 {d}/s.h5", "also the input --directions"),
    ("interpolate {d}/a.pt {d}/b.pt --out {d}/s.vts", "kdprobe loss surface"),
    ("interpolate {d}/a.pt {d}/b.pt --out {d}/a.html --h5 {d}/b.pt", "also the input"),
    ("eval {d}/a.pt --csv {d}/a.pt", "also the input"),
    ("eval {d}/a.pt --csv {d}/o.x --json {d}/o.x", "same file"),
    ("eval {d}/a.pt --csv {d}/sub", "is a folder"),
    ("eval {d}/a.pt --json {d}/e.csv", "CSV table"),
    ("eval {d}/a.pt --csv {d}/notes.txt", "text file"),
    ("eval {d}/a.pt --csv {d}/notes.txt/e.csv", "not a folder"),
    ("prune {d}/a.pt --method l1 --remaining 0.5 --out {d}/b.pt", "--overwrite"),
    ("prune {d}/a.pt --method l1 --remaining 0.5 --out {d}/a.pt --overwrite", "also the input"),
    ("prune {d}/a.pt --method l1 --remaining 0.5 --out {d}/trained.pt --overwrite", "made by kdprobe train"),
    ("train --out {d}/pruned.pt --overwrite", "made by kdprobe prune"),
    ("diversity {d}/a.pt {d}/b.pt --html {d}/b.pt", "also the input"),
    ("surplus {d}/e.csv --csv {d}/e.csv", "also the input"),
    ("info {d}/a.pt --json {d}/e.csv", "CSV table"),
    ("study demo --out {d}/a.pt", "is a file"),
    ("pipeline pruning --out {d}/notes.txt", "is a file"),
    # malformed checkpoints
    ("info {d}/arch_str.pt", "arch is str"),
    ("info {d}/arch_missing.pt", "arch is NoneType"),
    ("eval {d}/meta_list.pt", "meta is list"),
    ("eval {d}/meta_none.pt", "meta is NoneType"),
    ("info {d}/version_str.pt", "format_version"),
    ("info {d}/sd_list.pt", "state_dict"),
    ("info {d}/sd_ints.pt", "state_dict"),
    ("info {d}/shape_junk.pt", "input_shape"),
    ("info {d}/wide.pt", "GiB"),
    ("eval {d}/int_weights.pt", "stored as torch.int64"),
    ("prune {d}/nan.pt --method l1 --remaining 0.5 --out {d}/n.pt", "non-finite"),
    ("eval {d}/nan.pt", "non-finite"),
    ("diversity {d}/a.pt {d}/nan.pt", "non-finite"),
    ("landscape {d}/nan.pt --out {d}/n.vtk", "non-finite"),
    ("interpolate {d}/a.pt {d}/nan.pt --out {d}/n.h5", "non-finite"),
    ("eval {d}/flipped.pt", "corrupted"),
    ("eval {d}/trunc.pt", "truncated"),
    ("eval {d}/random.pt", "not a torch checkpoint"),
    ("info {d}/fifo.pt", "FIFO"),
    ("train --distill label --teacher {d}/fifo.pt --out {d}/n.pt", "FIFO"),
    ("eval {d}/sub", "is a folder"),
    # the ensemble-perspective commands share the same rules
    ("agreement {d}/a.pt {d}/b.pt --csv {d}/a.pt", "also the input"),
    ("calibration {d}/a.pt --json {d}/e.csv", "CSV table"),
    ("sharpness {d}/a.pt --html {d}/sub", "is a folder"),
    ("cka {d}/a.pt {d}/b.pt --csv {d}/o.x --json {d}/o.x", "same file"),
    ("agreement {d}/a.pt {d}/a_copy.pt", "byte-identical"),
    ("calibration {d}/nan.pt", "non-finite"),
    ("agreement {d}/a.pt {d}/flipped.pt", "corrupted"),
    # architectures, their arguments and input sizes (issue 11)
    ("eval {d}/a.pt --arch-kwargs {{nope", "--arch-kwargs"),
    ("eval {d}/a.pt --arch-kwargs [1,2]", "JSON object"),
    ("eval {d}/a.pt --arch {d}/zzz.pt=resnet8a", "names none of the checkpoints"),
    ("eval {d}/a.pt --arch resnet8a --arch resnet8b", "one --arch NAME for every file"),
    ("eval {d}/a.pt --arch repdistiller:wrn_99_1", "unknown model"),
    ("eval {d}/a.pt --arch resnet8b", "holds a resnet8a, not a resnet8b"),
    ('info {d}/a.pt --arch-kwargs {{"width":0.5}}', "drop --arch-kwargs"),
    ('prune {d}/a.pt --method weight --remaining 0.5 --out {d}/n.pt --arch-kwargs {d}/a.pt={{"width":1}}',
     "drop --arch-kwargs"),
    ("eval {d}/a.pt --image-size 0", "--image-size"),
    ("eval {d}/a.pt --image-size big", "--image-size"),
    ("landscape {d}/a.pt --out {d}/n.vtk --image-size 16", "pass --image-size 8"),
    ("diversity {d}/a.pt {d}/b.pt --reference cutmix", "reference group 'cutmix'"),
    ("train --distill none --feature-layer layer3 --out {d}/n.pt", "--feature-layer"),
    ('train --teacher-arch-kwargs {{"cfg":[1]}} --out {d}/n.pt', "--teacher-arch-kwargs"),
    ("train --init-arch resnet8a --out {d}/n.pt", "--init-arch"),
    ('train --init {d}/a.pt --model-kwargs {{"width":0.5}} --out {d}/n.pt', "--model-kwargs"),
    ("train --model-kwargs [1] --out {d}/n.pt", "JSON object"),
    ("train --model repdistiller:shufflev1 --distill feature --teacher {d}/a.pt --out {d}/n.pt", "--image-size 32"),
]


def _hashes(d: Path) -> dict:
    """Every path under d: sha256 of files, 'folder' for folders (so a new empty folder counts too)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else
            "folder" if p.is_dir() else "other" for p in sorted(d.rglob("*"))}


def _timeout(signum, frame):
    raise TimeoutError("the command blocked for 60 s")


@pytest.mark.parametrize("line, expected", CASES, ids=[c[0].replace("{d}/", "") for c in CASES])
def test_user_mistake_is_one_line_and_touches_nothing(w, line, expected):
    before = _hashes(w)
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    try:
        r = _invoke(*line.format(d=w).split())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.output
    assert expected in lines[0], lines[0]
    assert _hashes(w) == before  # no input or earlier output changed, nothing new written, no new folder
