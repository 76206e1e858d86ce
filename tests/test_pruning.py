"""Pruning surgery: known kept sets by hand, equivalence with masking, masks, counts, CLI."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.models import create_model
from kdprobe.pruning import (SKIP_PRESETS, apply_masks, bn_sparsity_step, count_flops, count_nonzero,
                             count_nonzero_flops, count_params, l1_plan, l1_prune, parse_remaining, parse_skip,
                             prunable_bns, slimming_plan, slimming_prune, slimming_was_trained, weight_prune)
from kdprobe.pruning.slimming import slimming_record


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine params and running stats, so equivalences are not 0 == 0."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.5
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


def _tiny_resnet(name="resnet8a", seed=0):
    torch.manual_seed(seed)
    return _randomize_bn(create_model(name, num_classes=10, in_channels=1, width=0.25), seed).eval()


def _x(n=3, c=1, s=8, seed=1):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- L1 (Li et al. 2016)

def test_l1_keeps_highest_sum_abs_filters_set_by_hand():
    m = _tiny_resnet()
    b1, b2, b3 = m.layer1[0], m.layer2[0], m.layer3[0]  # conv1 widths 4, 8, 16
    with torch.no_grad():
        b1.conv1.weight.copy_(torch.tensor([0.3, -0.9, 0.1, 0.5]).view(4, 1, 1, 1).expand(4, 4, 3, 3))
        # filter 0 alternates +-0.3: its plain sum is 0 but its L1 norm (10.8) beats filter 2 (3.6)
        signs = torch.tensor([1.0, -1.0]).repeat(18).view(4, 3, 3)
        b1.conv1.weight[0] = 0.3 * signs
        b2.conv1.weight.copy_(torch.tensor([0.1, -0.8, 0.3, 0.7, -0.2, 0.6, 0.05, 0.4]).view(8, 1, 1, 1).expand(8, 4, 3, 3))
    p = l1_prune(m, [0.75, 0.7, 0.9])
    # naive independent ranking for the random stage-3 filters
    w3 = b3.conv1.weight.detach()
    l1 = [float(w3[f].abs().sum()) for f in range(16)]
    top14 = sorted(sorted(range(16), key=lambda f: -l1[f])[:14])
    assert p.arch["kwargs"]["block_cfg"] == [3, 5, 14]  # floor(4*.75), floor(8*.7)=5, floor(16*.9)=14
    torch.testing.assert_close(p.layer1[0].conv1.weight, b1.conv1.weight[[0, 1, 3]])
    torch.testing.assert_close(p.layer2[0].conv1.weight, b2.conv1.weight[[1, 2, 3, 5, 7]])
    torch.testing.assert_close(p.layer3[0].conv1.weight, w3[top14])
    torch.testing.assert_close(p.layer2[0].bn1.running_var, b2.bn1.running_var[[1, 2, 3, 5, 7]])
    torch.testing.assert_close(p.layer2[0].conv2.weight, b2.conv2.weight[:, [1, 2, 3, 5, 7]])


@pytest.mark.parametrize("name", ["resnet8a", "resnet8a-subsample", "resnet8b"])
def test_l1_pruned_net_equals_zeroing_the_removed_channels(name):
    m = _tiny_resnet(name)
    src_state = {k: v.clone() for k, v in m.state_dict().items()}
    keep = l1_plan(m, [0.5, 0.4, 0.3])
    p = l1_prune(m, [0.5, 0.4, 0.3]).eval()
    # Equivalent unpruned net: the removed channels' post-BN-ReLU activations are zero, i.e.
    # conv2 ignores them (zeroing conv1 rows alone is NOT equivalent: bn1's shift survives).
    ref, rows_only = copy.deepcopy(m), copy.deepcopy(m)
    for blk_ref, blk_rows, k in zip([*ref.layer1, *ref.layer2, *ref.layer3],
                                    [*rows_only.layer1, *rows_only.layer2, *rows_only.layer3], keep):
        drop = [c for c in range(blk_ref.conv1.out_channels) if c not in set(k.tolist())]
        with torch.no_grad():
            blk_ref.conv2.weight[:, drop] = 0
            blk_rows.conv1.weight[drop] = 0
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(p(x), ref(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(p(x), rows_only(x), atol=1e-4)
    for k, v in m.state_dict().items():  # the source model is left untouched
        assert torch.equal(v, src_state[k])
    again = create_model(p.arch["name"], **p.arch["kwargs"])  # arch alone rebuilds it
    again.load_state_dict(p.state_dict())


def test_l1_skip_keeps_blocks_whole_and_floor_at_least_one():
    torch.manual_seed(0)
    m = create_model("resnet20a", num_classes=10, in_channels=1, width=0.25)  # 3 blocks per stage
    p = l1_prune(m, [0.5, 0.01, 0.5], skip=[(1, 2), (3, 3)])
    assert p.arch["kwargs"]["block_cfg"] == [2, 4, 2, 1, 1, 1, 8, 8, 16]


def test_skip_presets_match_reference_layer_ids():
    # rethinking-network-pruning res56prune.py / res110prune.py: 1-based conv ids in module
    # order, stem = 1, block k (0-based over the net) has its first conv at id 2k + 2.
    ref = {"resnet56-A": (9, [16, 20, 38, 54]), "resnet56-B": (9, [16, 18, 20, 34, 38, 54]),
           "resnet110-A": (18, [36]), "resnet110-B": (18, [36, 38, 74])}
    for key, (n, ids) in ref.items():
        blocks = {((i - 2) // 2 // n + 1, (i - 2) // 2 % n + 1) for i in ids}
        assert blocks == set(SKIP_PRESETS[key]), key


def test_parse_skip_and_remaining():
    assert parse_skip("B", depth=56) == list(SKIP_PRESETS["resnet56-B"])
    assert parse_skip("resnet110-b") == list(SKIP_PRESETS["resnet110-B"])
    assert parse_skip("1.8, 1.9,2.1") == [(1, 8), (1, 9), (2, 1)]
    assert parse_skip(None) == [] and parse_skip("none") == []
    for bad, depth in [("B", None), ("resnet56-B", 110), ("1-8", None), ("0.3", 20), ("x", None)]:
        with pytest.raises(KdprobeError):
            parse_skip(bad, depth=depth)
    assert parse_remaining("0.4,0.7,0.9") == [0.4, 0.7, 0.9]
    for bad in ["0", "1.5", "-0.1", "abc", "40", "0.4,,0.9", "nan"]:
        with pytest.raises(KdprobeError):
            parse_remaining(bad)
    m = _tiny_resnet()
    with pytest.raises(KdprobeError, match="block 1..1"):
        l1_prune(m, [0.5] * 3, skip=[(1, 2)])


def test_l1_rejects_other_architectures():
    v = create_model("vgg19_bn", num_classes=10, in_channels=1, cfg=[4, "M", 6])
    with pytest.raises(KdprobeError, match="l1 pruning supports CIFAR ResNets with basic blocks .*; got vgg19_bn"):
        l1_prune(v, [0.5] * 3)


# ---------------------------------------------------------------- Network Slimming (Liu et al. 2017)

def _tiny_vgg():
    torch.manual_seed(0)
    return _randomize_bn(create_model("vgg19_bn", num_classes=10, in_channels=1, cfg=[4, "M", 6, 8])).eval()


def _mask_bn_channels(model, plan):
    """Reference: zero gamma and beta of dropped channels, so their post-BN-ReLU output is 0."""
    ref = copy.deepcopy(model)
    bns = dict(prunable_bns(ref))
    for name, keep in plan.items():
        bn = bns[name]
        drop = [c for c in range(bn.num_features) if c not in set(keep.tolist())]
        with torch.no_grad():
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    return ref


def test_slimming_global_threshold_on_hand_set_scales_never_empties_a_layer():
    m = _tiny_vgg()
    gammas = [[0.9, -0.05, 0.5, 0.2], [0.01, 0.02, 0.03, -0.04, 0.06, 0.07],
              [0.8, 0.7, -0.6, 0.4, 0.3, 0.25, 0.15, 0.1]]
    for (_, bn), g in zip(prunable_bns(m), gammas):
        bn.weight.data = torch.tensor(g)
    # the reference rule by hand: 18 |gamma| ascending, index int(18 * 0.5) = 9 holds 0.2; keep > 0.2
    # (8 channels; the 0.2 itself goes), and the middle layer, all below, keeps its largest (0.07)
    plan, threshold = slimming_plan(m, 0.5)
    assert [v.tolist() for v in plan.values()] == [[0, 2], [5], [0, 1, 2, 3, 4, 5]]
    assert threshold == pytest.approx(0.2)
    rec = slimming_record(m, 0.5)
    assert rec["threshold_index"] == 9 and rec["channels_kept"] == 9 and rec["channels_prunable"] == 18
    assert rec["guarded_layers"] == [list(plan)[1]]
    p = slimming_prune(m, 0.5).eval()
    assert p.arch["kwargs"]["cfg"] == [2, "M", 1, 6]
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(p(x), _mask_bn_channels(m, plan)(x), atol=1e-5, rtol=1e-5)
    again = create_model(p.arch["name"], **p.arch["kwargs"])
    again.load_state_dict(p.state_dict())


def _reference_vggprune_counts(gammas: list[torch.Tensor], percent: float) -> list[int]:
    """The reference rule written the way vggprune.py writes it (Liu et al.): one flat |gamma| tensor,
    torch.sort ascending, thre = y[int(total * percent)], mask = |gamma|.gt(thre) per layer."""
    total = sum(g.numel() for g in gammas)
    bn = torch.zeros(total)
    index = 0
    for g in gammas:
        bn[index:index + g.numel()] = g.abs()
        index += g.numel()
    y, _ = torch.sort(bn)
    thre = y[int(total * percent)]
    return [int(g.abs().gt(thre).sum()) for g in gammas]


def test_slimming_vgg19_keeps_what_vggprune_keeps():
    # issue 10: VGG-19 has 5,504 prunable channels; the reference at --percent 0.5 keeps 2,751, not 2,752
    m = create_model("vgg19_bn", num_classes=10)
    g = torch.Generator().manual_seed(0)
    for _, bn in prunable_bns(m):
        bn.weight.data = torch.randn(bn.num_features, generator=g)
    gammas = [bn.weight.detach().clone() for _, bn in prunable_bns(m)]
    assert sum(x.numel() for x in gammas) == 5504
    for remaining, percent in ((0.5, 0.5), (0.7, 0.3), (0.3, 0.7)):  # --percent typed as the decimal 1 - remaining
        plan, _ = slimming_plan(m, remaining)
        assert [v.numel() for v in plan.values()] == _reference_vggprune_counts(gammas, percent)
    plan, _ = slimming_plan(m, 0.5)
    assert sum(v.numel() for v in plan.values()) == 2751
    # ties at the threshold go with it: scales = a random permutation of the ranks 0..5503, with ranks
    # 2700..2800 (spread over the layers) all set to 2752, the value at the cut; by hand, ranks
    # 2801..5503 survive: 2,703 channels
    ranks = torch.randperm(5504, generator=g).float()
    ranks[(ranks >= 2700) & (ranks <= 2800)] = 2752.0
    start = 0
    for _, bn in prunable_bns(m):
        bn.weight.data = ranks[start:start + bn.num_features].clone()
        start += bn.num_features
    gammas = [bn.weight.detach().clone() for _, bn in prunable_bns(m)]
    plan, threshold = slimming_plan(m, 0.5)
    assert threshold == 2752.0 and sum(v.numel() for v in plan.values()) == 5503 - 2800
    assert [v.numel() for v in plan.values()] == _reference_vggprune_counts(gammas, 0.5)
    # remaining 1 keeps every channel (no threshold); the record names no guarded layer
    rec = slimming_record(m, 1.0)
    assert rec["channels_kept"] == 5504 and "threshold" not in rec and rec["guarded_layers"] == []


def test_slimming_resnet_population_is_block_bn1_only():
    m = _tiny_resnet("resnet8b")
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():  # tiny trunk scales: they would win the ranking if they counted
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data = torch.rand(mod.num_features, generator=g) * 1e-3
    for blk in (m.layer1[0], m.layer2[0], m.layer3[0]):
        blk.bn1.weight.data = torch.rand(blk.bn1.num_features, generator=g) + 0.1
    vals = [(abs(float(v.detach())), li, c) for li, blk in enumerate((m.layer1[0], m.layer2[0], m.layer3[0]))
            for c, v in enumerate(blk.bn1.weight)]
    threshold = sorted(v for v, _, _ in vals)[int(len(vals) * 0.5)]  # the reference: index int(28 * 0.5)
    kept = [t for t in vals if t[0] > threshold]
    expect = [sorted(c for _, li, c in kept if li == layer) or None for layer in range(3)]
    plan, _ = slimming_plan(m, 0.5)
    got = [v.tolist() for v in plan.values()]
    for e, gl in zip(expect, got):
        assert e is None or e == gl
    p = slimming_prune(m, 0.5).eval()
    assert p.arch["kwargs"]["block_cfg"] == [len(v) for v in got]
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(p(x), _mask_bn_channels(m, plan)(x), atol=1e-5, rtol=1e-5)


def test_slimming_densenet_selection_matches_masking_and_composes():
    torch.manual_seed(0)
    m = _randomize_bn(create_model("densenet40", num_classes=10, in_channels=1, depth=10, growth=2)).eval()
    x = _x()
    plan, _ = slimming_plan(m, 0.4)
    p = slimming_prune(m, 0.4).eval()
    with torch.no_grad():
        torch.testing.assert_close(p(x), _mask_bn_channels(m, plan)(x), atol=1e-5, rtol=1e-5)
    plan2, _ = slimming_plan(p, 0.6)  # prune the pruned net again: selections compose
    p2 = slimming_prune(p, 0.6).eval()
    with torch.no_grad():
        torch.testing.assert_close(p2(x), _mask_bn_channels(p, plan2)(x), atol=1e-5, rtol=1e-5)
    again = create_model(p2.arch["name"], **p2.arch["kwargs"])
    again.load_state_dict(p2.state_dict())
    assert count_params(p2) < count_params(p) < count_params(m)


def test_bn_sparsity_step_and_trained_flag():
    m = _tiny_vgg()
    m.features[1].weight.data = torch.tensor([0.5, -0.2, 0.0, 1.0])
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.25)
    bn_sparsity_step(m, 0.1)
    torch.testing.assert_close(m.features[1].weight.grad, torch.tensor([0.35, 0.15, 0.25, 0.35]))
    assert torch.equal(m.features[0].weight.grad, torch.full_like(m.features[0].weight, 0.25))
    assert torch.equal(m.features[1].bias.grad, torch.full((4,), 0.25))
    assert slimming_was_trained({"config": {"bn_sparsity": 1e-5}})
    assert not slimming_was_trained({"config": {"bn_sparsity": 0.0}}) and not slimming_was_trained({})


# ---------------------------------------------------------------- weight-level (Han et al. 2015)

def test_weight_prune_keeps_exact_fraction_of_largest_conv_weights():
    m = _tiny_resnet("resnet8b")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    masks = weight_prune(m, 0.3)
    conv_keys = [f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert sorted(masks) == sorted(conv_keys) and "fc.weight" not in masks
    allw = torch.cat([before[k].abs().flatten() for k in conv_keys])
    n_keep = int(allw.numel() * 0.3)
    assert sum(int(mk.sum()) for mk in masks.values()) == n_keep
    cut = allw.sort(descending=True).values[n_keep - 1]  # naive threshold (no ties in random weights)
    for k in conv_keys:
        assert torch.equal(masks[k], before[k].abs() >= cut)
        assert torch.equal(m.state_dict()[k], before[k] * masks[k])
    for k, v in m.state_dict().items():  # classifier and BN untouched
        if k not in masks:
            assert torch.equal(v, before[k]), k
    assert set(m.state_dict()) == set(before)  # plain keys, no weight_orig/weight_mask
    assert count_nonzero(m) == count_params(m) - (allw.numel() - n_keep)


def test_weight_prune_ties_are_deterministic_and_masks_survive_sgd():
    m = _tiny_resnet("resnet8a")
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    for c in convs:
        c.weight.data.fill_(1.0)
    masks = weight_prune(m, 0.25)
    flat = torch.cat([masks[k].flatten() for k in masks])
    n_keep = int(flat.numel() * 0.25)
    assert torch.equal(flat, torch.arange(flat.numel()) < n_keep)  # earlier weights win ties
    torch.manual_seed(0)
    for c in convs:
        c.weight.data.normal_()
    masks = weight_prune(m, 0.25)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    kept_before = {k: v.detach().clone() for k, v in m.named_parameters() if k in masks}
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(m(_x(8)), torch.arange(8) % 10).backward()
        opt.step()
        apply_masks(m, masks)
    params = dict(m.named_parameters())
    for k, mk in masks.items():
        assert torch.all(params[k][~mk] == 0), k
        assert not torch.equal(params[k][mk], kept_before[k][mk])  # the kept weights did train
    with pytest.raises(KdprobeError):
        apply_masks(m, {"nope.weight": torch.ones(3, dtype=torch.bool)})


# ---------------------------------------------------------------- counts

def test_counts_by_hand_on_tiny_vgg():
    m = create_model("vgg19_bn", num_classes=10, in_channels=1, cfg=[4, "M", 6])
    # conv 1x4x3x3 + bn 2*4 + conv 4x6x3x3 + bn 2*6 + linear 6*10 + 10
    assert count_params(m) == 36 + 8 + 216 + 12 + 60 + 10
    # 8x8 conv, pool to 4x4, conv, then linear: 8*8*4*1*9 + 4*4*6*4*9 + 6*10
    m.train()
    rm = m.features[1].running_mean.clone()
    assert count_flops(m, (1, 8, 8)) == 2304 + 3456 + 60
    assert m.training and torch.equal(m.features[1].running_mean, rm)
    with torch.no_grad():
        m.features[0].weight.view(-1)[:18] = 0  # density 0.5 in the first conv
    assert count_nonzero_flops(m, (1, 1, 8, 8)) == 1152 + 3456 + 60


def test_resnet56_macs_match_hand_count():
    m = create_model("resnet56a", num_classes=10)
    stem = 32 * 32 * 16 * 3 * 9
    per = 2359296  # every non-downsampling 3x3 conv of a CIFAR ResNet: HWC_out*C_in*9 is constant
    down = 1179648  # first conv of stages 2 and 3
    assert count_flops(m, (3, 32, 32)) == stem + 18 * per + 2 * (down + 17 * per) + 640  # 125,485,696


# ---------------------------------------------------------------- CLI (called as a function)

def _ckpt(tmp_path, name, **kw):
    from kdprobe.checkpoints.format import save_checkpoint

    torch.manual_seed(0)
    m = _randomize_bn(create_model(name, num_classes=10, in_channels=1, **kw))
    meta = {"method": "scratch", "input_shape": [1, 8, 8], "test_acc": 0.9, "config": {"bn_sparsity": 0.0},
            "versions": {"torch": str(torch.__version__)}}  # plain str: weights_only loading rejects TorchVersion
    return save_checkpoint(tmp_path / f"{name}.pt", m, meta)


def test_cli_prune_l1_weight_and_slimming(tmp_path, capsys):
    from cli.prune import prune
    from kdprobe.checkpoints.format import load_checkpoint

    src = _ckpt(tmp_path, "resnet20a", width=0.25)
    prune(src, method="l1", remaining="0.5", skip="1.1", out=tmp_path / "l1.pt")
    ck = load_checkpoint(tmp_path / "l1.pt")
    p = ck.meta["pruning"]
    assert ck.model.arch["kwargs"]["block_cfg"] == [4, 2, 2, 4, 4, 4, 8, 8, 8]
    assert p["method"] == "l1" and p["skip"] == [[1, 1]] and p["params_after"] == count_params(ck.model)
    assert p["params_before"] > p["params_after"] and p["flops_before"] > p["flops_after"]
    assert "test_acc" not in ck.meta and p["source_test_acc"] == 0.9
    assert "params" in capsys.readouterr().out

    prune(src, method="weight", remaining="0.4", out=tmp_path / "w.pt")
    ck = load_checkpoint(tmp_path / "w.pt")
    assert set(ck.extra["masks"]) and ck.meta["pruning"]["nonzero_after"] == count_nonzero(ck.model)
    assert ck.meta["pruning"]["nonzero_flops_after"] < ck.meta["pruning"]["flops_after"]

    prune(src, method="slimming", remaining="0.5", out=tmp_path / "s.pt")
    assert "not trained with --bn-sparsity" in capsys.readouterr().err


def test_cli_prune_errors(tmp_path):
    from cli.prune import prune

    vgg = _ckpt(tmp_path, "vgg19_bn", cfg=[4, "M", 6])
    with pytest.raises(KdprobeError, match="l1 pruning supports CIFAR ResNets with basic blocks .*; got vgg19_bn"):
        prune(vgg, method="l1", remaining="0.5", out=tmp_path / "x.pt")
    for kwargs in [dict(method="slimming", remaining="1.5"), dict(method="weight", remaining="0.4,0.5"),
                   dict(method="slimming", remaining="0.5", skip="B"), dict(method="magic", remaining="0.5")]:
        with pytest.raises(KdprobeError):
            prune(vgg, out=tmp_path / "x.pt", **kwargs)
    assert not (tmp_path / "x.pt").exists()


def test_prune_checkpoint_returns_report_and_prints_nothing(tmp_path, capsys):
    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.pruning import prune_checkpoint

    src = _ckpt(tmp_path, "resnet20a", width=0.25)
    rep = prune_checkpoint(src, "slimming", [0.5], tmp_path / "s.pt")
    assert capsys.readouterr() == ("", "")  # the warning is returned as text, not printed
    assert len(rep.warnings) == 1 and "not trained with --bn-sparsity" in rep.warnings[0]
    pruned = load_checkpoint(tmp_path / "s.pt").model
    assert rep.after["params"] == count_params(pruned) and rep.before["params"] > rep.after["params"]
    assert rep.info == load_checkpoint(tmp_path / "s.pt").meta["pruning"] and rep.info["remaining"] == 0.5
    rep = prune_checkpoint(src, "L1", "0.5,1,1", tmp_path / "l1.pt")
    assert rep.method == "l1" and rep.warnings == () and rep.info["block_cfg"] == [2, 2, 2, 8, 8, 8, 16, 16, 16]


# ---------------------------------------------------------------- other codebases' networks (issue 11)

def test_slimming_the_rnp_vgg_is_slimming_vgg19_bn_under_other_key_names():
    cfg = [6, "M", 8, 8, "M", 10]
    torch.manual_seed(0)
    ours = _randomize_bn(create_model("vgg19_bn", num_classes=10, cfg=cfg)).eval()
    theirs = create_model("rnp-slimming:vgg19", num_classes=10, cfg=cfg).eval()
    theirs.load_state_dict({k.replace("features.", "feature."): v for k, v in ours.state_dict().items()})
    a, b = slimming_prune(ours, 0.5), slimming_prune(theirs, 0.5)
    assert b.arch["name"] == "rnp-slimming:vgg19" and b.arch["kwargs"]["cfg"] == a.arch["kwargs"]["cfg"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x))


def test_l1_on_repdistiller_resnet8x4_drops_whole_inner_channels():
    torch.manual_seed(0)
    model = _randomize_bn(create_model("repdistiller:resnet8x4", num_classes=10)).eval()
    pruned = l1_prune(model, [0.5, 0.25, 0.5]).eval()
    assert pruned.arch["kwargs"]["block_cfg"] == [32, 32, 128]  # floor(64*.5), floor(128*.25), floor(256*.5)
    ref = copy.deepcopy(model)
    for block, kept in zip((ref.layer1[0], ref.layer2[0], ref.layer3[0]), (32, 32, 128)):
        score = block.conv1.weight.abs().sum((1, 2, 3))  # Li et al.: the smallest sum|W| filters go
        dropped = torch.argsort(score, descending=True, stable=True)[kept:]
        with torch.no_grad():
            block.conv2.weight[:, dropped] = 0  # their post-BN-ReLU outputs no longer reach anything
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-4, atol=1e-5)


def _mask_selected(model, plan):
    """Reference for the rnp-slimming families: zero gamma and beta of every dropped channel, where a
    selection BN's plan indices are positions among the channels it selects now."""
    from kdprobe.models.rnp._common import ChannelSelection

    ref = copy.deepcopy(model)
    sel = {(n[: -len("select")] + "bn1" if n != "select" else "bn"): m.keep.tolist()
           for n, m in ref.named_modules() if isinstance(m, ChannelSelection)}
    bns = dict(prunable_bns(ref))
    for name, local in plan.items():
        chans = sel.get(name, list(range(bns[name].num_features)))
        keep = {chans[i] for i in local.tolist()}
        drop = [c for c in range(bns[name].num_features) if c not in keep]
        with torch.no_grad():
            bns[name].weight[drop] = 0
            bns[name].bias[drop] = 0
    return ref


@pytest.mark.parametrize("arch,kw", [("rnp-slimming:preresnet164", {"depth": 20}),
                                     ("rnp-slimming:densenet40", {"depth": 10, "growth": 4})])
def test_slimming_rnp_selection_networks_as_the_reference_prunes_them(arch, kw, tmp_path):
    """resprune.py / denseprune.py: every BN in the population; a BN before a selection stays whole and
    its dropped channels are switched off in `indexes`; the result computes what the masked net does."""
    from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = _randomize_bn(create_model(arch, num_classes=10, **kw)).eval()
    x = torch.randn(3, 3, 32, 32)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    n = sum(b.num_features for b in bns)
    assert sum(b.weight.numel() for _, b in prunable_bns(m)) == n  # the population: every BN
    plan, thr = slimming_plan(m, 0.5)
    flat = torch.cat([b.weight.detach().abs() for b in bns])
    assert thr == float(torch.sort(flat).values[int(n * 0.5)])  # the reference's threshold index
    assert sum(v.numel() for v in plan.values()) == int((flat > thr).sum())  # no layer emptied here
    p = slimming_prune(m, 0.5).eval()
    with torch.no_grad():
        torch.testing.assert_close(p(x), _mask_selected(m, plan)(x), atol=1e-5, rtol=1e-5)
    cfg = p.arch["kwargs"]["cfg"]
    assert cfg[-1] == p.fc.in_features == plan["bn"].numel()
    assert p.bn.num_features == m.bn.num_features  # kept whole: the selection switches channels off
    assert int(p.select.indexes.sum()) == plan["bn"].numel()
    assert count_params(p) < count_params(m)
    if "layer1.0.bn2" in plan:  # the pre-ResNet's bottleneck BNs shrink physically
        assert p.layer1[0].conv1.out_channels == p.layer1[0].bn2.num_features == plan["layer1.0.bn2"].numel()
        assert p.layer1[0].conv3.in_channels == plan["layer1.0.bn3"].numel() < m.layer1[0].conv3.in_channels
    # the file round-trips and is detected without --arch (cfg read off the tensors)
    save_checkpoint(tmp_path / "p.pt", p, {"method": "scratch"})
    back = load_checkpoint(tmp_path / "p.pt").model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), p(x))
    # prune the pruned network again: switched-off channels stay off, only selected ones compete
    plan2, _ = slimming_plan(p, 0.7)
    p2 = slimming_prune(p, 0.7).eval()
    with torch.no_grad():
        torch.testing.assert_close(p2(x), _mask_selected(p, plan2)(x), atol=1e-5, rtol=1e-5)
    assert torch.all(p2.select.indexes <= p.select.indexes)
    assert count_params(p2) < count_params(p)
