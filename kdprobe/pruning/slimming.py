"""Network Slimming (Liu et al. 2017): L1 sparsity on BN scales, then one global threshold.

Training: `bn_sparsity_step(model, lam)` after `loss.backward()` and before
`optimizer.step()` adds lam * sign(gamma) to the gradient of EVERY BatchNorm scale
(lambda 1e-4 for VGG, 1e-5 for ResNet/DenseNet in the paper).

Pruning follows the reference rule exactly (Liu et al.'s vggprune.py / resprune.py /
denseprune.py with `--percent p`): sort the n |gamma| of the population ascending, take the
threshold at index int(n * p), and keep the channels whose |gamma| is strictly above it (ties
with the threshold are removed too). kdprobe's `remaining` is the fraction KEPT, so
p = 1 - remaining, computed in decimal (remaining 0.7 is --percent 0.3, not 0.30000000000000004);
VGG-19's 5,504 channels at remaining 0.5 keep 5504 - 2752 - 1 = 2,751 (without ties).
remaining = 1 keeps every channel (the reference at --percent 0 would still drop the smallest).
One stated difference: a BN layer that would lose every channel keeps its largest-|gamma| one
(the reference crashes there instead); the pruning record lists those layers.
The population is the |gamma| of the prunable BNs of the architecture (below). What is
physically removed, per architecture:

- VGG (`vgg19_bn`, `rnp-slimming:vgg19`): every conv-BN layer is prunable; the network is rebuilt from a smaller
  `cfg`: conv output rows and the next conv's input columns, BN entries (running stats
  included) and the classifier's input columns of the dropped channels.
- CIFAR ResNet (`resnetXXa/b`, rnp-l1:, repdistiller:resnet8 ... resnet110, resnet8x4, resnet32x4): only bn1 of each basic block (the block's inner width) is
  prunable and in the population; the residual trunk (stem BN, bn2, shortcut BNs) keeps its
  16/32/64 channels, since every block adds into it. Rebuilt through `block_cfg`: conv1
  rows, bn1 entries, conv2 input columns (the same surgery as L1 pruning, other scores).
- DenseNet (`densenet40`): every BN (3n dense layers, 2 transitions, the final BN) is
  prunable; each reads the concatenated trunk, so its dropped channels become a channel
  selection (`selection` kwarg): the BN entries and the following conv's input columns
  (the classifier's for the final BN) are removed, while the concatenation itself keeps
  every channel, as in the reference's channel_selection layer.
- Network Slimming's own networks with channel-selection layers (`rnp-slimming:densenet40`,
  `rnp-slimming:preresnet164`), as its denseprune.py / resprune.py do: every BN is in the
  population. A BN followed by a channel selection keeps all its entries (the trunk needs
  them); its dropped channels are switched off in the selection's `indexes` and removed from
  the next conv's input columns (the classifier's after the final BN). The pre-ResNet's bn2
  and bn3 (inside a bottleneck) are removed physically: conv1/conv2 output rows, their BN
  entries, conv2/conv3 input columns. The trunk (conv3 outputs, downsample convs) keeps its
  widths. The new widths go to `cfg`, the reference's format. One stated extension: on a file
  that is already pruned, a selection's population is only the channels it still selects (a
  switched-off channel stays off; the reference scripts assume an unpruned input).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdprobe.errors import KdprobeError
from kdprobe.pruning._surgery import RESNETS, arch_of, is_cifar_resnet, rebuild, rebuild_resnet_inner, resnet_blocks

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


@torch.no_grad()
def bn_sparsity_step(model: nn.Module, lam: float) -> None:
    """Add lam * sign(gamma) to the .grad of every BN scale (after backward, before optimizer.step)."""
    if not lam >= 0:
        raise KdprobeError(f"expected a bn sparsity lambda >= 0 (1e-4 VGG, 1e-5 ResNet/DenseNet), got {lam}")
    if lam == 0:
        return
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None and m.weight.grad is not None:
            m.weight.grad.add_(torch.sign(m.weight), alpha=lam)


def slimming_was_trained(meta: dict) -> bool:
    """True when the checkpoint's config recorded a BN sparsity lambda > 0."""
    config = (meta or {}).get("config") or {}
    try:
        return float(config.get("bn_sparsity") or 0.0) > 0.0
    except (TypeError, ValueError):
        return False


def _vgg_seq(model) -> tuple[str, nn.Sequential]:
    """The conv-BN-ReLU Sequential of a slimming VGG: `features` (vgg19_bn) or `feature` (rnp-slimming:vgg19)."""
    return ("features", model.features) if hasattr(model, "features") else ("feature", model.feature)


def _vgg_bns(model) -> list[tuple[str, nn.Module]]:
    name, seq = _vgg_seq(model)
    return [(f"{name}.{i}", m) for i, m in enumerate(seq) if isinstance(m, nn.BatchNorm2d)]


def _densenet_bns(model) -> list[tuple[str, nn.Module]]:
    from kdprobe.models.densenet import BNReLUConv

    out = [(f"{n}.bn", m.bn) for n, m in model.named_modules() if isinstance(m, BNReLUConv)]
    return out + [("bn", model.bn)]


SUPPORTED = (f"vgg19_bn, rnp-slimming:vgg19, densenet40, rnp-slimming:densenet40, rnp-slimming:preresnet164 "
             f"and {RESNETS}")


def _select_units(model) -> list[tuple[str, str, nn.Module, str]]:
    """(BN prefix, selection prefix, selection, consumer weight key) for every BN -> channel
    selection pair of an rnp-slimming DenseNet or pre-ResNet, in forward order."""
    from kdprobe.models.rnp._common import ChannelSelection

    units = []
    for name, m in model.named_modules():
        if isinstance(m, ChannelSelection):
            base = name[: -len("select")]  # "dense1.0." / "layer1.0." or "" for the final one
            bn = f"{base}bn1" if base else "bn"
            units.append((bn, name, m, f"{base}conv1.weight" if base else "fc.weight"))
    return units


def _preresnet_inner(model) -> list[tuple[str, str, str]]:
    """(BN prefix, producing conv weight, consuming conv weight) of bn2 and bn3 in every bottleneck."""
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "bn3") and hasattr(m, "select"):
            out += [(f"{name}.bn2", f"{name}.conv1.weight", f"{name}.conv2.weight"),
                    (f"{name}.bn3", f"{name}.conv2.weight", f"{name}.conv3.weight")]
    return out


def _selected(model) -> dict[str, torch.Tensor]:
    """BN prefix -> the channels its selection passes on now (rnp-slimming families; else empty)."""
    if _family(model) not in ("rnp-densenet", "rnp-preresnet"):
        return {}
    return {bn: sel.keep.detach().cpu() for bn, _, sel, _ in _select_units(model)}


def _family(model: nn.Module) -> str:
    from kdprobe.models.densenet import DenseNet
    from kdprobe.models.rnp.vgg import SlimmingVGG
    from kdprobe.models.vgg import SlimVGG

    if isinstance(model, (SlimVGG, SlimmingVGG)):
        return "vgg"
    if isinstance(model, DenseNet):
        return "densenet"
    from kdprobe.models.rnp.densenet import SlimmingDenseNet
    from kdprobe.models.rnp.preresnet import SlimmingPreResNet

    if isinstance(model, SlimmingDenseNet):
        return "rnp-densenet"
    if isinstance(model, SlimmingPreResNet):
        return "rnp-preresnet"
    if is_cifar_resnet(model):
        return "resnet"
    raise KdprobeError(f"slimming pruning supports {SUPPORTED}; got {arch_of(model)[0]} (--method weight prunes any model)")


def prunable_bns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state_dict prefix, BN) of the BN layers whose scales form the threshold population."""
    fam = _family(model)
    if fam == "vgg":
        return _vgg_bns(model)
    if fam == "densenet":
        return _densenet_bns(model)
    if fam in ("rnp-densenet", "rnp-preresnet"):  # every BN, as denseprune.py / resprune.py
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return [(p + "bn1", blk.bn1) for _, _, p, blk in resnet_blocks(model)]


RULE = ("reference (Liu et al. vggprune.py --percent p, p = 1 - remaining): threshold = ascending sorted |gamma| "
        "at index int(n * p); keep |gamma| > threshold; a layer that would lose every channel keeps its largest")


def _percent(remaining: float) -> float:
    """The reference's --percent for a kept fraction: 1 - remaining in decimal arithmetic."""
    from decimal import Decimal

    return float(Decimal(1) - Decimal(repr(float(remaining))))


def _plan(model: nn.Module, remaining: float):
    """(plan, threshold, record, population size): the population is what the threshold ranks."""
    remaining = float(remaining)
    if not 0.0 < remaining <= 1.0:
        raise KdprobeError(f"expected remaining in (0, 1] (fraction of prunable channels kept), got {remaining}")
    bns, selected = prunable_bns(model), _selected(model)
    scales = [bn.weight.detach().abs().float().cpu() for _, bn in bns]
    # a selection's BN: only the channels it still passes on (plan indices point into those)
    scales = [s[selected[name]] if name in selected else s for (name, _), s in zip(bns, scales)]
    flat = torch.cat(scales)
    percent = _percent(remaining)
    index = int(flat.numel() * percent)  # the reference's thre_index, float product truncated as in Python
    threshold = None if remaining == 1.0 else float(torch.sort(flat).values[index])
    plan, guarded = {}, []
    for (name, _), s in zip(bns, scales):
        k = torch.ones_like(s, dtype=torch.bool) if threshold is None else s > threshold
        if not k.any():  # never empty a layer: keep its largest |gamma| (first on ties)
            k[int(torch.argmax(s))] = True
            guarded.append(name)
        plan[name] = torch.nonzero(k).flatten()
    rec = {"rule": RULE, "percent": percent, "threshold_index": index, "guarded_layers": guarded}
    return plan, threshold, rec, int(flat.numel())


def slimming_plan(model: nn.Module, remaining: float) -> tuple[dict[str, torch.Tensor], float | None]:
    """Kept channel indices (ascending) per prunable BN prefix, and the global |gamma| threshold
    (None for remaining = 1, which keeps everything)."""
    plan, threshold, _, _ = _plan(model, remaining)
    return plan, threshold


def slimming_record(model: nn.Module, remaining: float) -> dict:
    """What the pruning record says about a slimming cut: rule, percent, threshold (index and value),
    channels kept of prunable, and the layers the never-empty guard kept alive."""
    plan, threshold, rec, population = _plan(model, remaining)
    rec.update(channels_kept=sum(int(v.numel()) for v in plan.values()), channels_prunable=population)
    if threshold is not None:
        rec["threshold"] = threshold
    return rec


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, idx.to(t.device))


def _rebuild_vgg(model, plan: dict[str, torch.Tensor]) -> nn.Module:
    from kdprobe.models.vgg import POOL

    src = model.state_dict()
    state = dict(src)
    _, kwargs = arch_of(model)
    seq_name, seq = _vgg_seq(model)
    cfg, prev = [], None  # prev: kept channels of the previous conv's output
    for i, m in enumerate(seq):
        if isinstance(m, nn.MaxPool2d):
            cfg.append(POOL)
        elif isinstance(m, nn.Conv2d):
            conv, bn = f"{seq_name}.{i}", f"{seq_name}.{i + 1}"  # the BN right after this conv
            idx = plan[bn]
            w = _take(src[f"{conv}.weight"], 0, idx)
            state[f"{conv}.weight"] = w if prev is None else _take(w, 1, prev)
            for k in BN_KEYS:
                state[f"{bn}.{k}"] = _take(src[f"{bn}.{k}"], 0, idx)
            cfg.append(int(idx.numel()))
            prev = idx
    state["classifier.weight"] = _take(src["classifier.weight"], 1, prev)
    kwargs["cfg"] = cfg
    kwargs.pop("width", None)
    return rebuild(model, kwargs, state)


def _rebuild_densenet(model, plan: dict[str, torch.Tensor]) -> nn.Module:
    src = model.state_dict()
    state = dict(src)
    _, kwargs = arch_of(model)
    old = kwargs.get("selection") or [None] * len(model.bn_widths)
    selection = []
    for j, (name, _) in enumerate(_densenet_bns(model)):
        local = plan[name]
        prefix = name[: -len("bn")]  # "dense1.0." or "" for the final BN
        for k in BN_KEYS:
            state[f"{name}.{k}"] = _take(src[f"{name}.{k}"], 0, local)
        nxt = f"{prefix}conv.weight" if prefix else "fc.weight"
        state[nxt] = _take(src[nxt], 1, local)
        # compose with an existing selection: local indices point into the kept channels
        base = torch.arange(model.bn_widths[j]) if old[j] is None else torch.tensor(old[j], dtype=torch.long)
        selection.append(base[local.cpu()].tolist())
    kwargs["selection"] = selection
    return rebuild(model, kwargs, state)


def _rebuild_selecting(model, plan: dict[str, torch.Tensor]) -> nn.Module:
    """rnp-slimming DenseNet / pre-ResNet: selections switch channels off, bottleneck BNs shrink."""
    src = model.state_dict()
    state = dict(src)
    _, kwargs = arch_of(model)
    width = {}  # BN prefix -> the width it leaves for the next layer (the new cfg entry)
    for bn, sel_name, sel, consumer in _select_units(model):
        local = plan[bn]  # positions among the channels selected now
        kept = sel.keep.detach().cpu()[local.cpu()]
        mask = torch.zeros_like(src[f"{sel_name}.indexes"])
        mask[kept.to(mask.device)] = 1.0
        state[f"{sel_name}.indexes"] = mask
        state[consumer] = _take(src[consumer], 1, local)
        width[bn] = int(local.numel())
    for bn, producer, consumer in _preresnet_inner(model):
        idx = plan[bn]
        state[producer] = _take(state[producer], 0, idx)  # state: conv2 may have lost columns already
        state[consumer] = _take(state[consumer], 1, idx)
        for k in BN_KEYS:
            state[f"{bn}.{k}"] = _take(src[f"{bn}.{k}"], 0, idx)
        width[bn] = int(idx.numel())
    if _family(model) == "rnp-densenet":
        kwargs["cfg"] = [width[bn] for bn, *_ in _select_units(model)]
    else:  # per block [select, conv1 out, conv2 out], then the final select
        kwargs["cfg"] = [width[b] for bn, *_ in _select_units(model)[:-1]
                         for b in (bn, bn[: -len("bn1")] + "bn2", bn[: -len("bn1")] + "bn3")] + [width["bn"]]
    return rebuild(model, kwargs, state)


def slimming_prune(model: nn.Module, remaining: float) -> nn.Module:
    """Liu et al. 2017 channel pruning by global |gamma| ranking; returns the rebuilt, smaller model."""
    plan, _ = slimming_plan(model, remaining)
    fam = _family(model)
    if fam == "vgg":
        return _rebuild_vgg(model, plan)
    if fam == "densenet":
        return _rebuild_densenet(model, plan)
    if fam in ("rnp-densenet", "rnp-preresnet"):
        return _rebuild_selecting(model, plan)
    return rebuild_resnet_inner(model, [plan[p + "bn1"] for _, _, p, _ in resnet_blocks(model)])
