"""Which eval-mode BatchNorms may be folded into the convolution before them, for any nn.Module.

Folding W' = W * g/sqrt(var+eps), b' = (b - mean) * g/sqrt(var+eps) + beta is exact only when
the BN's input is nothing but that conv's output, used by nothing else. Two ways to prove it:

1. torch.fx (`symbolic_trace`): the graph shows every use of every value. Models with
   data-dependent Python control flow (RepDistiller's fixed-window heads, PyramidNet's shortcut
   padding, ...) cannot be traced, so:
2. one recorded forward on a probe batch: hooks note each conv's output tensor and each BN's
   input tensor, and a TorchFunctionMode counts every other operation that reads a conv output
   (metadata reads such as .shape excepted). A pair is folded when the BN received exactly a
   conv's output object, each ran once, and nothing else touched that output.

Either way only stock modules are folded (a subclass that overrides forward is left alone),
the folded copy is checked against the unfolded model on the probe batch (logits within float
rounding), and anything unproven or disagreeing runs unfolded: the numbers are the same either
way, only the speed differs. Root-level forward hooks of the model (the input hook of
kdprobe.data.preprocess) are kept on the folded copy.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from kdprobe.runtime.precision import fp32_exact

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# reading these of a conv output does not use its values
_METADATA = frozenset({"size", "dim", "numel", "stride", "is_contiguous", "element_size", "is_floating_point",
                       "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "__len__"})


def _stock_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _stock_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN) and type(m).forward is _BN.forward and m.running_mean is not None


def _fuse(root: nn.Module, conv_name: str, conv: nn.Module) -> None:
    """Replace the conv `conv_name` of `root` by a copy with a (zero) bias, where the folded shift goes."""
    fused = copy.deepcopy(conv)
    if fused.bias is None:
        fused.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
    parent, _, leaf = conv_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, fused)


def _pair(conv_name, bn_name, conv, bn) -> tuple:
    return conv_name, bn_name, conv.bias is not None, bn.eps, bn.affine


def _fx_plan(model: nn.Module):
    """fx route: (folded GraphModule, pairs), or (None, []) when the forward cannot be traced."""
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model))
    except Exception:  # noqa: BLE001 - untraceable forward (data-dependent control flow): the recorded route
        return None, []
    mods = dict(gm.named_modules())
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    pairs = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _stock_bn(mods[node.target]):
            continue
        bn, src = mods[node.target], node.args[0] if node.args else None
        if (len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node) or src.op != "call_module"
                or not _stock_conv(mods[src.target]) or len(src.users) != 1
                or uses[src.target] != 1 or uses[node.target] != 1
                or mods[src.target].out_channels != bn.num_features):
            continue
        conv = mods[src.target]
        _fuse(gm, src.target, conv)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        pairs.append(_pair(src.target, node.target, conv, bn))
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    for hook in model._forward_pre_hooks.values():  # fx traces forward itself: root hooks would be lost
        gm.register_forward_pre_hook(hook)
    for hook in model._forward_hooks.values():
        gm.register_forward_hook(hook)
    return gm, pairs


class _Uses(TorchFunctionMode):
    """Counts operations outside a BN's own forward that read a recorded conv output."""

    def __init__(self, produced: dict):
        super().__init__()
        self.produced, self.uses, self.in_bn = produced, Counter(), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: .shape reads metadata, .data/.T alias the values
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if self.in_bn == 0 and name not in _METADATA:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self.produced:
                    self.uses[id(t)] += 1
        return func(*args, **kwargs)


@torch.no_grad()
def _recorded_plan(model: nn.Module, x: torch.Tensor):
    """Recorded route: (folded copy, pairs) from one forward on x (see the module docstring)."""
    m = copy.deepcopy(model).eval()
    names = {mod: n for n, mod in m.named_modules() if n}
    calls: Counter = Counter()
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (conv, tensor): the tensor kept alive, ids unique
    fed: dict[str, torch.Tensor] = {}
    mode = _Uses(produced)

    def conv_out(mod, args, out):
        calls[names[mod]] += 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[mod], out)

    def bn_in(mod, args):
        calls[names[mod]] += 1
        fed[names[mod]] = args[0] if args else None
        mode.in_bn += 1

    def bn_out(mod, args, out):
        mode.in_bn -= 1

    handles = []
    for mod, n in names.items():
        if _stock_conv(mod):
            handles.append(mod.register_forward_hook(conv_out))
        elif _stock_bn(mod):
            handles += [mod.register_forward_pre_hook(bn_in), mod.register_forward_hook(bn_out)]
    try:
        with mode:
            m(x)
    except Exception:  # noqa: BLE001 - the model fails on the probe batch: nothing proven, run unfolded
        return None, []
    finally:
        for h in handles:
            h.remove()
    mods = dict(m.named_modules())
    pairs = []
    for bn_name, t in fed.items():
        hit = produced.get(id(t)) if isinstance(t, torch.Tensor) else None
        if hit is None or hit[1] is not t:
            continue
        conv_name, (conv, bn) = hit[0], (mods[hit[0]], mods[bn_name])
        if (calls[conv_name] == 1 and calls[bn_name] == 1 and mode.uses[id(t)] == 0
                and conv.out_channels == bn.num_features):
            pairs.append(_pair(conv_name, bn_name, conv, bn))
    for conv_name, bn_name, *_ in pairs:
        _fuse(m, conv_name, mods[conv_name])
        parent, _, leaf = bn_name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, nn.Identity())
    return m, pairs


def fold_plan(model: nn.Module, x: torch.Tensor | None = None):
    """(module with every provable conv->BN pair folded, pairs, how): how is 'fx', 'recorded' or 'none'.

    pairs: (conv name, bn name, conv had a bias, eps, affine); the module takes the parameters the
    caller folds (kdprobe.probes.landscape_eval) through functional_call."""
    gm, pairs = _fx_plan(model)
    how = "fx"
    if gm is None and x is not None:
        gm, pairs = _recorded_plan(model, x)
        how = "recorded"
    if gm is None or not pairs:
        return None, [], "none"
    return gm.eval(), pairs, how


def fold_state(t: dict[str, torch.Tensor], pairs, keys: set) -> dict[str, torch.Tensor]:
    """Stacked parameters (P, ...) of the unfolded model -> those of the folded module (keys)."""
    out = {k: v for k, v in t.items() if k in keys}
    for conv, bn, has_bias, eps, affine in pairs:
        w, mean, var = t[conv + ".weight"], t[bn + ".running_mean"], t[bn + ".running_var"]
        s = torch.rsqrt(var + eps)
        beta = torch.zeros_like(s)
        if affine:
            s, beta = s * t[bn + ".weight"], t[bn + ".bias"]
        b = t[conv + ".bias"] if has_bias else torch.zeros_like(s)
        out[conv + ".weight"] = w * s.reshape(s.shape + (1,) * (w.dim() - s.dim()))
        out[conv + ".bias"] = (b - mean) * s + beta
    assert set(out) == keys, sorted(keys ^ set(out))
    return out


@torch.no_grad()
def agrees(model: nn.Module, folded: nn.Module, pairs, x: torch.Tensor) -> bool:
    """Does the folded module give the unfolded model's eval-mode logits on x (float rounding aside)?

    Both run in true fp32 (kdprobe.runtime.precision.fp32_exact): under TF32 (10-bit mantissas, cuDNN's default
    for convolutions on this torch build) two exact-equivalent graphs differ by more than rtol 1e-3 on
    deep models, and the check would switch folding off for rounding, not for a real difference."""
    with fp32_exact():
        return _agrees(model, folded, pairs, x)


def _agrees(model: nn.Module, folded: nn.Module, pairs, x: torch.Tensor) -> bool:
    ref = copy.deepcopy(model).eval()
    t = {k: v[None] for k, v in [*ref.named_parameters(), *ref.named_buffers()]}
    try:
        params = {k: v[0] for k, v in fold_state(t, pairs, set(folded.state_dict())).items()}
        got, want = functional_call(folded, params, (x,)), ref(x)
    except Exception:  # noqa: BLE001 - the folded copy does not run (a forward reading a BN attribute)
        return False
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape):
        return False
    scale = float(want.abs().max()) if want.numel() else 1.0
    return bool(torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4 * max(1.0, scale)))
