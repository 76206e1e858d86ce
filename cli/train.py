"""`kdprobe train`: one training run -> one self-describing checkpoint (resumes after a kill).

Thin: parses the options, calls kdprobe.api.training.train (kdprobe.train) and prints what it returns."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import log_flags as lf
from cli.common import ImageSize, ranged
from kdprobe.models.registry import WIDTH
from trainers.config import GENERATIONS

O = typer.Option


def train(
    out: Annotated[Optional[Path], O("--out", "-o", help="Checkpoint to write (.pt); OUT.partial holds resume state, OUT.jsonl the per-epoch log. Needed unless --print-config.")] = None,
    config: Annotated[Optional[Path], O("--config", help="A TOML file of the run, in the form of a study cell ([train], [method], seed; --print-config writes one; docs/train.md). An option typed here wins over the file; one not typed takes the file's value, else the preset's, else its default. The file never names --out, nor code to run (a python: model: type --model).", metavar="FILE.toml")] = None,
    print_config: Annotated[bool, O("--print-config", help="Print the run's fully resolved config (the --config form: every setting, the schedule included) and exit without training; --out is not needed.")] = False,
    model: Annotated[Optional[str], O(help="Registry name, variant included: resnet20 (=resnet20b, 1x1-conv shortcut), resnet56a (zero-pad shortcut), vgg19_bn, densenet40, pyramidnet110, repdistiller:wrn_16_2, rnp-slimming:vgg19, torchvision:resnet18, python:MODULE:FACTORY (imports and runs your module), ... (`kdprobe models`). Default resnet20; with --init the model comes from the init checkpoint.")] = None,
    dataset: Annotated[Optional[str], O(help="digits (embedded, offline), cifar10, cifar100, or imagefolder:PATH (PATH/train, PATH/test; a .tar.gz works too). Default digits.")] = None,
    data_dir: Annotated[Optional[Path], O(help="Folder with torchvision's CIFAR files.")] = None,
    download: Annotated[bool, O(help="Download CIFAR into --data-dir first (needs internet).")] = False,
    seed: Annotated[Optional[int], O(help="Seed for initialization, data order and augmentation (0 to 2**63-1; default 0).", callback=ranged("seed"))] = None,
    preset: Annotated[Optional[str], O(help="Reference schedule: fast (digits), repdistiller, rnp, cutmix, finetune. Explicit options and a --config file's values override it.")] = None,
    epochs: Annotated[Optional[int], O(help="Epochs (default: preset's, else 15).", callback=ranged("epochs"))] = None,
    batch_size: Annotated[Optional[int], O(help="Images per step.", callback=ranged("batch_size"))] = None,
    lr: Annotated[Optional[float], O(help="Initial learning rate (> 0).", callback=ranged("lr"))] = None,
    schedule: Annotated[Optional[str], O(help="step | cosine | constant.")] = None,
    milestones: Annotated[Optional[str], O(help="Step schedule: comma-separated epochs, or fractions of the run (0.5,0.75).")] = None,
    weight_decay: Annotated[Optional[float], O(help="L2 weight decay (>= 0).", callback=ranged("weight_decay"))] = None,
    nesterov: Annotated[Optional[bool], O("--nesterov/--no-nesterov", help="Nesterov momentum.")] = None,
    augment: Annotated[Optional[str], O(help="standard (crop pad 4 + flip; the default) | cutmix | autoaugment (CIFAR-10 policy, one sub-policy per image) | none.")] = None,
    cutmix_prob: Annotated[Optional[float], O(help="CutMix: probability per batch (default 0.5).", callback=ranged("cutmix_prob"))] = None,
    cutmix_beta: Annotated[Optional[float], O(help="CutMix: lambda ~ Beta(b, b), b > 0 (default 1).", callback=ranged("cutmix_beta"))] = None,
    distill: Annotated[Optional[str], O(help="none (the default) | label (Hinton KD) | feature (normalized L1 on the last feature map, 1x1 regressor) | at | fitnet | sp | rkd | pkt | crd | dkd (the KD families with RepDistiller/mdistiller defaults; docs/kd-methods.md).")] = None,
    teacher: Annotated[Optional[list[Path]], O(help="Teacher checkpoint (kdprobe's, or foreign with --teacher-arch). Repeat it for an ensemble of teachers: label KD and DKD distil from the average of their probabilities (feature methods take one teacher).")] = None,
    teacher_arch: Annotated[Optional[str], O(help="Architecture of a foreign teacher checkpoint (default: detected; names as for --arch, see `kdprobe eval --help`).")] = None,
    teacher_arch_kwargs: Annotated[Optional[str], O(help="Keyword arguments of the teacher's architecture, a JSON object.", metavar="JSON")] = None,
    feature_layer: Annotated[Optional[str], O(help="Feature KD: the student module whose output is tapped (NAME, or NAME:in for its input; names as in model.named_modules()). Default: the model's feature_layer (the last map before pooling), else the last (N,C,H,W) map before the classifier.")] = None,
    teacher_feature_layer: Annotated[Optional[str], O(help="Feature KD: the teacher module tapped (default as --feature-layer).")] = None,
    image_size: ImageSize = None,
    alpha: Annotated[Optional[float], O(help="Label KD: weight of the KL term (default 0.9, the paper's).", callback=ranged("alpha"))] = None,
    temperature: Annotated[Optional[float], O(help="Label KD: temperature T (default 4, the paper's).", callback=ranged("temperature"))] = None,
    beta: Annotated[Optional[float], O(help="Feature KD weight (default per family: ResNet 500, VGG 1500, DenseNet-40 1000, PyramidNet-110 1000, -200 2000).", callback=ranged("beta"))] = None,
    bn_sparsity: Annotated[Optional[float], O(help="Network Slimming: L1 sub-gradient lambda on BN scales (1e-4 VGG, 1e-5 ResNet/DenseNet; default 0, off).", callback=ranged("bn_sparsity"))] = None,
    init: Annotated[Optional[Path], O(help="Start from this checkpoint (e.g. a pruned one from `kdprobe prune`, or a foreign one); the model (and its widths) come from it, so --model/--width are refused.")] = None,
    init_arch: Annotated[Optional[str], O(help="Architecture of a foreign --init checkpoint (default: detected).")] = None,
    init_arch_kwargs: Annotated[Optional[str], O(help="Keyword arguments of the --init architecture, a JSON object.", metavar="JSON")] = None,
    model_kwargs: Annotated[Optional[str], O(help="Keyword arguments of --model, a JSON object (e.g. '{\"width_mult\": 0.5}' for torchvision:mobilenet_v2); --width adds to it.", metavar="JSON")] = None,
    width: Annotated[Optional[float], O(help="Width multiplier for ResNets/VGG (> 0; tiny models for quick runs).", callback=ranged(WIDTH))] = None,
    train_subset: Annotated[Optional[int], O(help="Train on a seeded subset of this many images (>= 1).", callback=ranged("train_subset"))] = None,
    kd_settings: Annotated[Optional[str], O(help="A KD family's settings that differ from its reference defaults, a JSON object, e.g. '{\"beta\": 6}' for dkd (names: docs/kd-methods.md; `kdprobe info` shows what a run used).", metavar="JSON")] = None,
    generations: Annotated[Optional[int], O(help="Born-again chain of K generations (0, the default: one run at OUT): generation g is taught by generation g-1, generation 1 by --teacher (or, without one, by a generation 0 trained from scratch); checkpoints OUT stem + -gen{g}; finished generations are kept, an interrupted one resumes.", callback=ranged(GENERATIONS))] = None,
    device: Annotated[str, O(help="auto | cpu | cuda | cuda:N.")] = "auto",
    deterministic: Annotated[bool, O("--deterministic/--no-deterministic", help="On a GPU: deterministic cuDNN/cuBLAS kernels (default), so the same seed gives the same checkpoint on the same GPU model and versions; --no-deterministic lets cuDNN autotune (faster, differs run to run). No effect on a CPU.")] = True,
    overwrite: Annotated[bool, O(help="Retrain although OUT exists: OUT is replaced when the new checkpoint is complete (never deleted up front), and a partial state of another configuration is replaced by the new run's first save.")] = False,
    quiet: Annotated[bool, O(help="No progress bar.")] = False,
    log: lf.Log = None,
    log_dir: lf.LogDir = None,
    log_project: lf.LogProject = None,
):
    """Train one model (scratch, CutMix, AutoAugment, label/feature KD, the KD families, ensemble teachers, fine-tuning) and save a checkpoint, or a born-again chain of them."""
    from kdprobe.api.training import train as run, train_config_toml

    options = dict(out=out, config=config, model=model, dataset=dataset, data_dir=data_dir, download=download, seed=seed,
                   preset=preset, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, milestones=milestones,
                   weight_decay=weight_decay, nesterov=nesterov, augment=augment, cutmix_prob=cutmix_prob,
                   cutmix_beta=cutmix_beta, distill=distill, teacher=teacher, teacher_arch=teacher_arch,
                   teacher_arch_kwargs=teacher_arch_kwargs, feature_layer=feature_layer,
                   teacher_feature_layer=teacher_feature_layer, image_size=image_size, alpha=alpha,
                   temperature=temperature, beta=beta, bn_sparsity=bn_sparsity, init=init, init_arch=init_arch,
                   init_arch_kwargs=init_arch_kwargs, model_kwargs=model_kwargs, width=width, train_subset=train_subset,
                   kd_settings=kd_settings, generations=generations, device=device, deterministic=deterministic,
                   overwrite=overwrite, quiet=quiet, log=log, log_dir=log_dir, log_project=log_project)
    if print_config:
        typer.echo(train_config_toml(**options), nl=False)
        return
    res = run(**options)
    for r in res.generations or (res,):
        g = f"generation {r.meta['generation']['generation']}: " if res.generations else ""
        if r.action == "existing":
            typer.echo(f"{g}{r.path} exists; nothing to do (pass --overwrite to retrain)")
            continue
        cfg = r.config
        resumed = f" (resumed from epoch {r.resumed_from_epoch:.2f})" if r.resumed_from_epoch is not None else ""
        typer.echo(f"{g}{cfg.method} {cfg.model} seed {cfg.seed}: test accuracy {r.test_acc:.2%} (last epoch; best {r.best_acc:.2%}){resumed}")
        typer.echo(f"checkpoint: {r.path}   log: {r.log}")
    if log:
        from trainers.trackers import default_dir, where_logged

        typer.echo(where_logged(log, log_dir, default_dir(res.path)))
