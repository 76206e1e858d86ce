"""The one training loop. Recipes plug in a batch transform and a loss (trainers.recipes).

Data lives on the device as uint8 tensors and is shuffled/augmented there with one seeded
generator, so a run is a pure function of (config, device): the same command after a kill
resumes from `OUT.partial` and ends with the same checkpoint as an uninterrupted run. What the
model itself draws (dropout) comes from torch's global CPU and CUDA generators: OUT.partial saves
their states and a resumed run restores them. On a GPU that holds only with deterministic kernels
(kdprobe.runtime.precision.deterministic: the default, `deterministic=False` lets cuDNN autotune instead)
and TF32 off for what autocast leaves in fp32 (kdprobe.runtime.precision.fp32_exact); both are recorded in
the checkpoint's metadata under "numerics".
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from kdprobe.checkpoints.format import FORMAT_VERSION, library_versions, load_checkpoint, read_payload, save_checkpoint
from kdprobe.data.datasets import TensorData, load_dataset
from kdprobe.errors import Interrupted, KdprobeError
from kdprobe.probes.evaluate import evaluate
from kdprobe.checkpoints.inputs import check_model_data
from kdprobe.files.io import atomic_write_text, output_lock, save_torch, sha256_file
from kdprobe.models import create_model
from kdprobe.models.registry import canonical_name
from kdprobe.runtime.precision import deterministic as deterministic_kernels
from kdprobe.runtime.precision import determinism_state, fp32_exact, nondeterministic_op, set_cublas_workspace, tf32_enabled
from kdprobe.data.preprocess import EVAL_RULE, TRAIN_RULE, fit_input, input_size_of, pin_size
from kdprobe.pruning import apply_masks, bn_sparsity_step
from trainers.config import TrainConfig
from trainers.distributed import DistContext, resolve_device  # noqa: F401  (re-exported for the CLI)
from trainers.recipes import Recipe

STATE_VERSION = 1
SYNC_EVERY_CUDA = 25  # steps between host syncs on a GPU (finiteness check, progress numbers)


class Progress:
    """What the loop reports; the CLI supplies a tqdm-backed one. This default is silent."""

    def start(self, total_steps: int, done_steps: int, desc: str) -> None: ...
    def step(self, n: int, postfix: dict) -> None: ...
    def epoch(self, record: dict) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    """Where the checkpoint went and the accuracies it reports (last epoch, and best)."""

    path: Path
    test_acc: float
    best_acc: float
    resumed_from_epoch: float | None


EVAL_SUBSET_SEED = 0  # one fixed per-epoch test subset for every run, so runs compare on the same images


def subset_rule(config: TrainConfig) -> str:
    """How the training images were chosen, in words (recorded in every checkpoint)."""
    if not config.train_subset:
        return "the whole training split"
    seed = f"seed {config.seed} (the run's)" if config.subset_seed is None else f"seed {config.subset_seed}"
    if config.subset_rule == "balanced":
        return (f"class-balanced subset of {config.train_subset}: train_subset // classes images per class (the first "
                f"train_subset % classes classes one more), drawn with {seed}")
    return f"random subset of {config.train_subset}, drawn with {seed}"


def test_eval_rule(config: TrainConfig) -> str:
    """What the per-epoch and the final test accuracies are on (recorded in every checkpoint)."""
    if not config.eval_subset:
        return "every epoch on the whole test split"
    return (f"epochs before the last on a class-balanced subset of {config.eval_subset} test images (seed "
            f"{EVAL_SUBSET_SEED}); the last epoch, test_acc, on the whole test split (best_acc mixes the two)")


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def log_path(out: Path) -> Path:
    return out.with_suffix(".jsonl")


def rng_states(device: torch.device) -> dict:
    """torch's global generators (dropout and any other draw a model makes): CPU, and the device's CUDA one."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict | None, device: torch.device) -> None:
    """Put back what rng_states saved (a partial from before they were saved has none: nothing to restore)."""
    if not states:
        return
    torch.set_rng_state(states["cpu"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def _lr_factor(config: TrainConfig, epoch: int) -> float:
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.gamma ** sum(epoch >= m for m in config.milestone_epochs())


def _teacher_info(config: TrainConfig, device, data: TensorData, path: str | None = None):
    """(teacher model in eval mode, what the checkpoint records about it) of `path` (default: the first teacher)."""
    path = path or config.teacher
    if not path:
        return None, None
    ck = load_checkpoint(path, arch=config.teacher_arch, arch_kwargs=config.teacher_arch_kwargs or None,
                         map_location=device, finite=True, arch_flag="--teacher-arch")
    # shapes, classes and dataset identity; the teacher takes its own image size (record or family)
    check_model_data(ck, data, explicit=False, role="teacher")
    for p in ck.model.parameters():
        p.requires_grad_(False)  # the teacher is never trained: no grads, eval mode
    info = {"path": str(path), "sha256": ck.sha256, "arch": ck.model.arch,
            "method": ck.meta.get("method"), "recipe": ck.meta.get("config"),
            "test_acc": ck.meta.get("test_acc"), "dataset": ck.meta.get("dataset")}
    return ck.model.eval(), info


def _build_model(config: TrainConfig, data: TensorData):
    if config.init:
        ck = load_checkpoint(config.init, arch=config.init_arch, arch_kwargs=config.init_arch_kwargs or None,
                             map_location=data.train_x.device, finite=True, arch_flag="--init-arch")
        # shapes, classes and dataset identity; the input hook the student keeps for training
        check_model_data(ck, data, explicit=False, role="init", image_size=config.image_size)
        model = ck.model
        if canonical_name(config.model) != model.arch["name"]:
            raise KdprobeError(f"the config names model {config.model}, but --init {config.init} holds a "
                               f"{model.arch['name']}; the model comes from the init checkpoint, so drop --model")
        kw = model.arch["kwargs"]
        lie = next((k for k, v in config.model_kwargs.items() if k not in kw or kw[k] != v), None)
        if lie is not None:
            raise KdprobeError(f"the config sets {lie}={config.model_kwargs[lie]!r}, but --init {config.init} was "
                               f"built with {lie}={kw.get(lie, '<none>')!r}; the model comes from the init "
                               "checkpoint, so drop --width and other model options")
        init = {"path": str(config.init), "sha256": ck.sha256, "method": ck.meta.get("method"),
                "test_acc": ck.meta.get("test_acc"), "pruning": ck.meta.get("pruning")}
        return model.train(), dict(ck.extra.get("masks", {})), init
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels, **config.model_kwargs)
    fit_input(model, {}, data, config.image_size)  # torchvision models: 224 px batches by default
    return model, {}, None


def _open_trackers(spec, config: TrainConfig, out: Path, data: TensorData, dev, ddp, history: list, saved):
    """The run's trainers.trackers.RunLog, started (None without trackers): its config, and the epochs of
    `history` a tracker run continued from OUT.partial lacks."""
    if spec is None or not spec.kinds:
        return None
    from kdprobe.version import __version__
    from trainers.trackers import RunLog, error_line

    doc = {"config": config.to_dict(), "method": config.method, "fingerprint": config.fingerprint(),
           "checkpoint": str(out.resolve()), "dataset": data.name, "device": dev.type, "world_size": ddp.world_size,
           "kdprobe_version": __version__}
    runlog = RunLog(spec)
    try:
        runlog.start(doc, history, (saved or {}).get("trackers"))
    except KdprobeError:
        raise
    except Exception as e:  # a tracker's own failure (a locked store, a bad WANDB_MODE): say which, in one line
        raise KdprobeError(f"--log {','.join(spec.kinds)}: could not start the tracker run: {error_line(e)}") from None
    return runlog


def run_key(config: TrainConfig) -> str:
    """What a partial run must match to be continued: the config with teacher and init named by
    content (sha256), so a moved folder still resumes and a replaced teacher file does not. The
    checkpoint format is part of it: a model name's meaning is tied to it (format 2 changed what
    `resnetXXa` computes), so a partial run from before never resumes as another network."""
    sha = lambda p: sha256_file(p) if p and Path(p).exists() else None  # noqa: E731
    named = dict(config.to_dict(), teacher=sha(config.teacher), init=sha(config.init), checkpoint_format=FORMAT_VERSION)
    if config.extra_teachers:
        named["extra_teachers"] = [sha(p) for p in config.extra_teachers]
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()


def partial_matches(config: TrainConfig, out) -> bool:
    """True when OUT.partial is a killed run of exactly this config (so train() will continue it)."""
    return read_payload(partial_path(Path(out))).get("run_key") == run_key(config)


def snapshot_path(out: Path, epoch: int) -> Path:
    """Where `snapshot_epochs` puts the checkpoint of the model at the end of `epoch`."""
    return out.with_name(f"{out.stem}-epoch{epoch}{out.suffix}")


def _resumable(ppath: Path, key: str, overwrite: bool) -> dict | None:
    """The saved state in OUT.partial if it continues this config; None to start afresh.

    With overwrite, a state of another config (or a damaged one) is not read and not deleted: the
    new run's first save replaces it atomically, so a run stopped before that loses nothing."""
    if not ppath.exists():
        return None
    try:
        saved = read_payload(ppath)
    except KdprobeError as e:
        if overwrite:
            return None
        raise KdprobeError(f"cannot resume from {ppath}: {e}; pass --overwrite to start afresh") from None
    if saved.get("run_key") == key:
        return saved  # the same config: continuing gives the same result as starting again, only sooner
    if overwrite:
        return None
    raise KdprobeError(f"{ppath} is a partial run of a different configuration; delete it or pass --overwrite "
                       "to start afresh")


def _numerics(train_fn):
    """Run train() with TF32 off and, on a GPU, deterministic kernels unless deterministic=False (see the module
    docstring); an op without a deterministic CUDA kernel fails with the flag that lets it run."""

    @functools.wraps(train_fn)
    def run(config: TrainConfig, out, *, device: str = "auto", deterministic: bool = True, **kwargs):
        dev = resolve_device(device)
        with ExitStack() as stack:
            stack.enter_context(fp32_exact())  # what autocast leaves in fp32 (BN, loss, optimizer) is IEEE fp32
            if dev.type == "cuda":  # CPU kernels are deterministic already (same machine type and threads)
                set_cublas_workspace()  # before this run's first cuBLAS call
                stack.enter_context(deterministic_kernels(deterministic))
            try:
                return train_fn(config, out, device=device, **kwargs)
            except RuntimeError as e:
                msg = nondeterministic_op(e)
                if msg is None:
                    raise
                raise KdprobeError(f"{msg}; this model runs an op without a deterministic CUDA kernel: pass "
                                   "--no-deterministic (deterministic=False) to train it, not reproducibly") from None

    return run


@_numerics
def train(config: TrainConfig, out, *, device: str = "auto", progress: Progress | None = None,
          save_interval_s: float = 60.0, stop_after_steps: int | None = None,
          snapshot_epochs: tuple[int, ...] = (), overwrite: bool = False, record: dict | None = None,
          trackers=None) -> TrainResult:
    """Train per `config`, resuming from OUT.partial if a killed run left one; returns the result.

    record: entries added to the checkpoint's metadata as they are (e.g. a born-again chain's
    {"generation": {...}}); they describe the run and are no part of what it must match to resume.

    OUT, OUT.partial and OUT.jsonl are locked for the whole run (kdprobe.files.io.output_lock): a second
    run to the same OUT fails at once, and the final rename never replaces a file that another
    program put at OUT meanwhile (an OUT that was there at the start is replaced as before).

    Everything (dataset, model, teacher, init) is loaded and checked before the first write. An
    existing OUT is replaced only when the new checkpoint is complete (atomic rename); with
    `overwrite`, an OUT.partial of another config is replaced by this run's first saved state.

    Under torchrun (WORLD_SIZE > 1) the global batch `config.batch_size` is split across the
    ranks with DistributedDataParallel; lr applies to the global batch, unscaled, so K
    processes train the same recipe as one (up to per-rank BatchNorm statistics).

    deterministic (keyword, default True): on a GPU, deterministic kernels (see `_numerics`); False lets
    cuDNN autotune instead, faster and not reproducible run to run. No effect on a CPU.

    trackers: a trainers.trackers.TrackerSpec: every epoch also goes to TensorBoard / W&B / MLflow (rank 0 only);
    OUT.partial keeps where each tracker stands, so a resumed run continues its tracker runs.
    """
    out = Path(out)
    with output_lock((out, partial_path(out), log_path(out)), command="train"):
        return _train(config, out, device=device, progress=progress, save_interval_s=save_interval_s,
                      stop_after_steps=stop_after_steps, snapshot_epochs=snapshot_epochs, overwrite=overwrite,
                      record=record or {}, trackers=trackers)


def _train(config: TrainConfig, out: Path, *, device: str, progress: Progress | None, save_interval_s: float,
           stop_after_steps: int | None, snapshot_epochs: tuple[int, ...], overwrite: bool,
           record: dict, trackers=None) -> TrainResult:
    out, progress = Path(out), progress or Progress()
    ddp = DistContext.from_env(device)
    dev = ddp.device
    if not ddp.is_main:
        progress = Progress()
    torch.manual_seed(config.seed)  # model and regressor initialization: identical on every rank
    data = load_dataset(config.dataset, config.data_dir)
    if config.train_subset:
        data = data.subset(n_train=config.train_subset, balanced=config.subset_rule == "balanced",
                           seed=config.seed if config.subset_seed is None else config.subset_seed)
    data = data.to(dev)
    # per-epoch evaluation on a fixed balanced test subset (cheap on a CPU); the last epoch on the whole split
    probe = data.subset(n_test=config.eval_subset, balanced=True, seed=EVAL_SUBSET_SEED) if config.eval_subset \
        else data
    model, masks, init_info = _build_model(config, data)
    model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    masks = {k: v.to(dev) for k, v in masks.items()}
    loaded = [_teacher_info(config, dev, data, p) for p in config.teachers]
    teachers, teacher_infos = [t for t, _ in loaded], [i for _, i in loaded]
    teacher_info = teacher_infos[0] if teacher_infos else None
    for teacher in teachers:
        if input_size_of(model) is not None and input_size_of(teacher) is None:
            # the student trains on S x S crops; a teacher of the data's own size gets them resized back
            h, w = data.image_size
            if h != w:
                raise KdprobeError(f"the student trains on {input_size_of(model)}px crops but the teacher takes the "
                                   f"data's own {h}x{w} images; pass --image-size native, or use a teacher with an "
                                   "image size")
            pin_size(teacher, h)
    recipe = Recipe(config, model, teachers or None, data)
    if recipe.sampler is not None and ddp.world_size > 1:
        raise KdprobeError(f"--distill crd under torchrun ({ddp.world_size} processes): CRD's memory bank is updated "
                           "with each rank's own samples and would differ between ranks; train CRD in one process")
    size = input_size_of(model)  # recorded: a checkpoint says what size and normalization its model takes
    input_shape = [data.in_channels, size, size] if size else list(data.train_x.shape[1:])
    student = recipe.student(model)
    opt = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov, weight_decay=config.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    n, bs = len(data.train_y), config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    # sums: loss * n, correct, n of the epoch so far; terms: each logged loss term (KD runs) * n
    state = {"epoch": 0, "step": 0, "perm": None, "history": [], "sums": [0.0, 0, 0], "terms": {}}
    resumed = None
    key = run_key(config)
    ppath = partial_path(out)
    saved = _resumable(ppath, key, overwrite)
    saved_at = None  # epoch (with fraction) of the state in OUT.partial that a rerun continues
    if saved is not None:
        student.load_state_dict(saved["student"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["gen"])
        restore_rng_states(saved.get("rng"), dev)  # dropout continues where the killed run was
        masks = {k: v.to(dev) for k, v in saved.get("masks", {}).items()} or masks
        state = {k: saved.get(k, v) for k, v in state.items()}  # a partial from before "terms" has none
        if state["perm"] is not None:
            state["perm"] = state["perm"].to(dev)
        resumed = saved_at = state["epoch"] + state["step"] / steps_per_epoch
    step_module = ddp.wrap(student)

    def save_partial():
        nonlocal saved_at
        # never overwrite the last good state with diverged weights
        if not all(bool(torch.isfinite(p).all()) for p in student.parameters()):
            raise KdprobeError(f"weights became non-finite at epoch {state['epoch'] + 1} step {state['step']}; "
                               f"the last good state is kept in {ppath}; lower --lr or check the data")
        if not ddp.is_main:
            return
        payload = {"version": STATE_VERSION, "run_key": key, "student": student.state_dict(),
                   "optimizer": opt.state_dict(), "gen": gen.get_state(), "masks": masks, "rng": rng_states(dev),
                   **dict(state, sums=torch.as_tensor(state["sums"]).tolist(),
                          terms={k: float(v) for k, v in state["terms"].items()}),
                   **({"trackers": runlog.state()} if runlog is not None else {})}
        save_torch(payload, ppath)
        saved_at = state["epoch"] + state["step"] / steps_per_epoch

    def metadata() -> dict:
        hist = state["history"]
        best = max(hist, key=lambda r: r["test_acc"])
        return {
            "made_by": "train", "method": config.method, "recipe": config.method, "config": config.to_dict(),
            "fingerprint": config.fingerprint(), "seed": config.seed, "dataset": data.name,
            "data_fingerprint": data.fingerprint,
            "data_dir": str(Path(config.data_dir).resolve()) if config.data_dir else None,
            "input_shape": input_shape, "image_size": size, "num_classes": data.num_classes,
            "normalization": {"mean": list(data.mean), "std": list(data.std)},
            **({"input_rule": {"eval": EVAL_RULE, "train": TRAIN_RULE}} if size else {}),
            **({"feature_kd": recipe.feature} if recipe.feature else {}),
            **({"kd": recipe.kd} if recipe.kd else {}),
            **({"teachers": teacher_infos} if teacher_infos else {}),
            **({"teacher_ensemble": recipe.ensemble} if recipe.ensemble else {}),
            "epochs": config.epochs, "epoch": hist[-1]["epoch"], "reported": "last-epoch",
            "test_acc": hist[-1]["test_acc"], "train_acc": hist[-1]["train_acc"], "best_acc": best["test_acc"],
            "best_epoch": best["epoch"], "history": hist, "teacher": teacher_info, "init": init_info,
            "pruning": (init_info or {}).get("pruning"), "global_batch": bs, "world_size": ddp.world_size,
            "train_images": n, "train_subset_rule": subset_rule(config), "test_eval": test_eval_rule(config),
            "per_rank_batch": math.ceil(bs / ddp.world_size), "lr_rule": "lr is per global batch; not scaled with world size",
            "device": dev.type, "cpu_threads": torch.get_num_threads(), "versions": library_versions(),
            # what decides whether a GPU rerun gives the same bits (kdprobe.runtime.precision)
            "numerics": {"autocast": "bf16", "tf32": tf32_enabled(), **determinism_state()} if dev.type == "cuda"
            else {"autocast": None, "tf32": tf32_enabled()},
            **record,
        }

    def write_checkpoint(path: Path):
        extra = {}
        if recipe.regressor is not None:
            extra["regressor"] = {k: v.detach().cpu() for k, v in recipe.regressor.state_dict().items()}
        if recipe.method is not None and len(recipe.method.state_dict()):
            # the family's heads (FitNet's regressor, CRD's embeddings and Z); CRD's memory bank (n_data x 128 per
            # model) is resume state only: OUT.partial keeps it, the checkpoint does not
            extra["kd_method"] = {k: v.detach().cpu() for k, v in recipe.method.state_dict().items()
                                  if not k.startswith("crd.memory.memory_")}
        if masks:
            extra["masks"] = {k: v.cpu() for k, v in masks.items()}
        if ddp.is_main:
            save_checkpoint(path, model, metadata(), extra)

    runlog = _open_trackers(trackers, config, out, data, dev, ddp, state["history"], saved) if ddp.is_main else None
    progress.start(config.epochs * steps_per_epoch, state["epoch"] * steps_per_epoch + state["step"],
                   f"{config.method} {config.model} seed {config.seed}")
    last_save, steps_run, trained = time.monotonic(), 0, False
    try:
        while state["epoch"] < config.epochs:
            epoch = state["epoch"]
            for g in opt.param_groups:
                g["lr"] = config.lr * _lr_factor(config, epoch)
            if state["perm"] is None:
                state["perm"] = torch.randperm(n, generator=gen, device=dev)
            student.train()
            t0 = time.monotonic()
            sums = state["sums"] = torch.tensor(state["sums"], dtype=torch.float64, device=dev)  # loss*n, correct, n
            tsums = state["terms"] = {k: torch.tensor(float(v), dtype=torch.float64, device=dev)
                                      for k, v in state["terms"].items()}
            while state["step"] < steps_per_epoch:
                idx = state["perm"][state["step"] * bs:(state["step"] + 1) * bs]
                # every rank augments the whole global batch with the shared generator, then
                # keeps its slice: the random stream and CutMix partners match a 1-process run
                mb = ddp.shard(recipe.batch(data.train_x[idx], data.train_y[idx], gen))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    terms = recipe.loss(step_module, mb, index=idx, epoch=epoch + 1, gen=gen)
                loss = terms["loss"]
                # Host syncs cost GPU throughput, so on CUDA the loss is checked (together with the
                # running sum of the steps in between) every SYNC_EVERY_CUDA steps; on CPU every step.
                sync = (dev.type != "cuda" or (state["step"] + 1) % SYNC_EVERY_CUDA == 0
                        or state["step"] + 1 == steps_per_epoch)
                if sync and not torch.isfinite(sums[0] + loss.detach().double()):
                    where = f"step {state['step'] + 1}" if dev.type != "cuda" else f"steps up to {state['step'] + 1}"
                    raise KdprobeError(f"loss became non-finite at epoch {epoch + 1}, {where}; the last good state is "
                                       f"kept in {ppath}; lower --lr or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.bn_sparsity > 0:
                    bn_sparsity_step(model, config.bn_sparsity)
                opt.step()
                if masks:
                    apply_masks(model, masks)
                nb = len(mb.y_a)
                sums[0] += loss.detach().double() * nb  # on the device: no sync per step
                sums[1] += (terms["logits"].argmax(1) == mb.y_a).sum()
                sums[2] += nb
                for k, v in terms.items():
                    if k not in ("loss", "logits"):
                        tsums[k] = tsums.get(k, 0.0) + v.detach().double() * nb
                state["step"] += 1
                steps_run += 1
                progress.step(1, {k: round(float(v.detach()), 4) for k, v in terms.items() if k != "logits"}
                              if sync else {})
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    save_partial()
                    raise KeyboardInterrupt  # a test's stand-in for Ctrl-C
                if time.monotonic() - last_save > save_interval_s:
                    save_partial()
                    last_save = time.monotonic()
            on = data if epoch + 1 == config.epochs else probe
            ev = evaluate(model, on.test_x, on.test_y, data.mean, data.std)
            names = sorted(tsums)
            s = ddp.sum_counts(sums.tolist() + [float(tsums[k]) for k in names])
            rec = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": s[0] / s[2],
                   "train_acc": s[1] / s[2], "test_loss": ev.loss, "test_acc": ev.acc,
                   "test_images": len(on.test_y),
                   # a KD run's loss terms (ce, kd, ...), each averaged over the epoch's images like train_loss
                   **{f"train_{k}": t / s[2] for k, t in zip(names, s[3:])}}
            state.update(epoch=epoch + 1, step=0, perm=None, sums=[0.0, 0, 0], terms={},
                         history=state["history"] + [rec])
            timed = dict(rec, seconds=round(time.monotonic() - t0, 2))
            progress.epoch(timed)
            if runlog is not None:  # before the resume state: a kill in between re-logs this epoch, never skips it
                runlog.epoch(timed)
            if epoch + 1 in snapshot_epochs and epoch + 1 < config.epochs:
                write_checkpoint(snapshot_path(out, epoch + 1))
            save_partial()
            last_save = time.monotonic()
            if ddp.is_main:
                atomic_write_text(log_path(out), "".join(json.dumps(r) + "\n" for r in state["history"]))
        trained = True
    except KeyboardInterrupt:
        # say what a rerun continues from: only a state this config saved counts
        raise Interrupted(None if saved_at is None or not ddp.is_main else
                          f"partial work is saved in {ppath} (epoch {saved_at:.2f} of {config.epochs})") from None
    finally:
        progress.close()
        recipe.close()
        if runlog is not None and not trained:  # stopped: the tracker runs end as killed
            runlog.close(ok=False)
    model.to(memory_format=torch.contiguous_format)
    write_checkpoint(out)
    if runlog is not None:
        runlog.close(ok=True)
    ddp.barrier()
    if ddp.is_main:
        ppath.unlink(missing_ok=True)
    hist = state["history"]
    return TrainResult(out, hist[-1]["test_acc"], max(r["test_acc"] for r in hist), resumed)
