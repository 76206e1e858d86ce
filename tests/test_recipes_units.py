"""Unit tests of the recipe building blocks: augmentations and KD losses (CPU, tiny)."""
import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import autoaugment as tv_aa

from kdprobe.errors import KdprobeError
from trainers.augment import (CIFAR10_POLICY, AutoAugmentDraw, apply_auto_augment, auto_augment,
                              cutmix, draw_auto_augment, mixed_cross_entropy, random_crop_flip,
                              sample_beta)
from trainers.losses import (FeatureRegressor, check_shapes, default_beta, feature_kd_loss, match_spatial,
                             label_kd_loss)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- label KD
def _softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def test_label_kd_hand_computed():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    y = [1, 2]
    alpha, temp = 0.9, 4.0
    ce = sum(-math.log(_softmax(s[i])[y[i]]) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        ps = _softmax([a / temp for a in s[i]])
        pt = _softmax([a / temp for a in t[i]])
        kl += sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(3))
    expected = (1 - alpha) * ce + alpha * temp**2 * kl / 2
    out = label_kd_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                        torch.tensor(y), alpha=alpha, temperature=temp)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert out["kd"].item() == pytest.approx(temp**2 * kl / 2, rel=1e-12)


def test_label_kd_alpha0_is_plain_ce_and_teacher_gets_no_grad():
    g = gen(1)
    s = torch.randn(5, 7, generator=g, requires_grad=True)
    t = torch.randn(5, 7, generator=g, requires_grad=True)
    y = torch.randint(7, (5,), generator=g)
    out = label_kd_loss(s, t, y, alpha=0.0)
    assert torch.equal(out["loss"], F.cross_entropy(s, y))
    label_kd_loss(s, t, y)["loss"].backward()
    assert t.grad is None and s.grad is not None


def test_label_kd_t1_alpha1_is_batchmean_kl_loop():
    g = gen(2)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    total = 0.0
    for i in range(4):
        ps, pt = _softmax(s[i].tolist()), _softmax(t[i].tolist())
        total += sum(pt[k] * (math.log(pt[k]) - math.log(ps[k])) for k in range(5))
    out = label_kd_loss(s, t, y, alpha=1.0, temperature=1.0)
    assert out["loss"].item() == pytest.approx(total / 4, rel=1e-12)


def test_label_kd_equal_logits_zero_kd_and_mixed_targets():
    g = gen(3)
    s = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ya, yb = torch.randint(4, (6,), generator=g), torch.randint(4, (6,), generator=g)
    out = label_kd_loss(s, s.clone(), ya, yb, 0.3)
    assert out["kd"].item() == 0.0
    logp = torch.log_softmax(s, 1)
    ce_a = -sum(logp[i, ya[i]].item() for i in range(6)) / 6
    ce_b = -sum(logp[i, yb[i]].item() for i in range(6)) / 6
    assert out["ce"].item() == pytest.approx(0.3 * ce_a + 0.7 * ce_b, rel=1e-12)
    assert mixed_cross_entropy(s, ya, yb, 0.3).item() == pytest.approx(0.3 * ce_a + 0.7 * ce_b)


def test_label_kd_rejects_bad_input():
    with pytest.raises(KdprobeError):
        label_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(KdprobeError):
        label_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                      alpha=1.5)


# ---------------------------------------------------------------- feature KD
def _identity_regressor(c):
    r = FeatureRegressor(c, c)
    with torch.no_grad():
        r.conv.weight.copy_(torch.eye(c)[:, :, None, None])
    return r


def _naive_feat(sf, tf, reg, reduction):
    with torch.no_grad():
        ps = reg(sf).double().numpy()
    pt = tf.double().numpy()
    n = ps.shape[0]
    total, count = 0.0, 0
    for i in range(n):
        a, b = ps[i].ravel(), pt[i].ravel()
        na = math.sqrt(sum(v * v for v in a))
        nb = math.sqrt(sum(v * v for v in b))
        for u, v in zip(a, b):
            total += abs(v / nb - u / na)
            count += 1
    return total / count if reduction == "mean" else total / n


def test_feature_loss_zero_for_identity_and_scaled_maps():
    g = gen(4)
    f = torch.randn(3, 4, 2, 2, generator=g)
    logits = torch.randn(3, 5, generator=g)
    y = torch.randint(5, (3,), generator=g)
    reg = _identity_regressor(4)
    out = feature_kd_loss(f, f.clone(), reg, y, None, 1.0, logits, beta=500.0)
    assert out["feat_raw"].item() == 0.0 and out["feat"].item() == 0.0
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, y).item())
    scaled = feature_kd_loss(3.7 * f, f, reg, y, None, 1.0, logits, beta=500.0)
    assert scaled["feat_raw"].item() == pytest.approx(0.0, abs=1e-6)
    other = feature_kd_loss(torch.randn(3, 4, 2, 2, generator=g), f, reg, y, None, 1.0, logits,
                            beta=500.0)
    assert other["feat_raw"].item() > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum_per_sample"])
def test_feature_loss_matches_naive_loop(reduction):
    torch.manual_seed(0)  # only for the regressor's default init
    g = gen(5)
    sf = torch.randn(3, 4, 2, 3, generator=g)
    tf = torch.randn(3, 6, 2, 3, generator=g)
    logits = torch.randn(3, 5, generator=g)
    ya, yb = torch.randint(5, (3,), generator=g), torch.randint(5, (3,), generator=g)
    reg = FeatureRegressor(4, 6)
    out = feature_kd_loss(sf, tf, reg, ya, yb, 0.25, logits, beta=10.0, reduction=reduction)
    raw = _naive_feat(sf, tf, reg, reduction)
    assert out["feat_raw"].item() == pytest.approx(raw, rel=1e-5)
    assert out["feat"].item() == pytest.approx(10.0 * raw, rel=1e-5)
    ce = 0.25 * F.cross_entropy(logits, ya).item() + 0.75 * F.cross_entropy(logits, yb).item()
    assert out["loss"].item() == pytest.approx(ce + 10.0 * raw, rel=1e-5)


def test_feature_shape_checks_and_beta_defaults():
    with pytest.raises(KdprobeError):
        check_shapes(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4))
    with pytest.raises(KdprobeError):  # the loss itself compares maps of one size (the recipe pools first)
        feature_kd_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4), _identity_regressor(4),
                        torch.zeros(2, dtype=torch.long), None, 1.0, torch.zeros(2, 3), beta=1.0)
    assert default_beta("resnet56b") == 500 and default_beta("ResNet110") == 500
    assert default_beta("vgg19") == 1500 and default_beta("densenet40") == 1000
    assert default_beta("pyramidnet110") == 1000 and default_beta("pyramidnet200") == 2000
    assert default_beta("repdistiller:wrn_40_2") == 500 and default_beta("repdistiller:resnet32x4") == 500
    assert default_beta("repdistiller:vgg13") == 1500 and default_beta("rnp-slimming:preresnet164") == 500
    assert default_beta("torchvision:wide_resnet50_2") == 500
    with pytest.raises(KdprobeError, match="pass --beta"):
        default_beta("repdistiller:mobilenetv2")


def test_match_spatial_pools_the_larger_map_and_commutes_with_the_regressor():
    g = gen(6)
    big = torch.randn(2, 4, 8, 8, generator=g)
    small = match_spatial(big, (4, 4))
    naive = big.reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 block means, by hand
    torch.testing.assert_close(small, naive)
    assert match_spatial(big, (8, 8)) is big  # equal sizes: untouched (same numbers as before)
    odd = match_spatial(torch.arange(6.0).reshape(1, 1, 1, 6), (1, 4))  # windows [0,2) [1,3) [3,5) [4,6)
    torch.testing.assert_close(odd.flatten(), torch.tensor([0.5, 1.5, 3.5, 4.5]))
    torch.manual_seed(0)
    reg = FeatureRegressor(4, 6)
    with torch.no_grad():  # pooling and a 1x1 conv commute: pool-then-regress = regress-then-pool
        torch.testing.assert_close(reg(match_spatial(big, (4, 4))), match_spatial(reg(big), (4, 4)))


# ---------------------------------------------------------------- CutMix
def _distinct_batch(n=6, c=2, h=8, w=8):
    return torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)


def test_cutmix_lam_is_unchanged_area_and_labels_follow_perm():
    x, y = _distinct_batch(), torch.arange(6) * 10
    for seed in range(20):
        mb = cutmix(x, y, gen(seed), prob=1.0)
        perm = mb.perm
        assert torch.equal(mb.y_b, y[perm]) and torch.equal(mb.y_a, y)
        from_x = (mb.x == x).all(dim=1)            # (N, H, W)
        from_p = (mb.x == x[perm]).all(dim=1)
        moved = [i for i in range(6) if perm[i] != i]
        assert torch.all(from_x | from_p)         # every pixel comes from x or its partner
        box = from_p[moved[0]] & ~from_x[moved[0]]
        for i in moved:                           # one box for the whole batch
            assert torch.equal(from_p[i] & ~from_x[i], box)
        assert mb.lam == pytest.approx(1.0 - box.sum().item() / 64)
        assert x.data_ptr() != mb.x.data_ptr()    # input untouched
    assert torch.equal(x, _distinct_batch())


def test_cutmix_prob0_seeded_and_coin_frequency():
    x, y = _distinct_batch(), torch.arange(6)
    mb = cutmix(x, y, gen(0), prob=0.0)
    assert torch.equal(mb.x, x) and torch.equal(mb.y_b, y) and mb.lam == 1.0
    a, b = cutmix(x, y, gen(7), prob=1.0), cutmix(x, y, gen(7), prob=1.0)
    assert torch.equal(a.x, b.x) and a.lam == b.lam and torch.equal(a.y_b, b.y_b)
    g, small = gen(8), torch.zeros(2, 1, 4, 4)
    hits = sum(cutmix(small, torch.arange(2), g, prob=0.3).perm is not None for _ in range(2000))
    assert abs(hits / 2000 - 0.3) < 0.05           # binomial sd ~ 0.010


def test_sample_beta_matches_scipy():
    draws = sample_beta(2.0, 0.5, gen(9), n=4000).numpy()
    assert scipy.stats.kstest(draws, scipy.stats.beta(2.0, 0.5).cdf).pvalue > 1e-3
    uni = sample_beta(1.0, 1.0, gen(10), n=4000).numpy()
    assert scipy.stats.kstest(uni, "uniform").pvalue > 1e-3


# ---------------------------------------------------------------- crop + flip
def _crop_matches(x, out, pad):
    """(N, 2p+1, 2p+1, 2) bool: does out[i] equal padded crop at (oy, ox), flipped or not."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    k = 2 * pad + 1
    res = torch.zeros(n, k, k, 2, dtype=torch.bool)
    for oy in range(k):
        for ox in range(k):
            crop = padded[:, :, oy:oy + h, ox:ox + w]
            res[:, oy, ox, 0] = (crop == out).flatten(1).all(1)
            res[:, oy, ox, 1] = (crop.flip(-1) == out).flatten(1).all(1)
    return res


def test_random_crop_flip_is_a_padded_crop():
    g = gen(11)
    x = torch.randint(1, 256, (1000, 1, 8, 8), generator=g, dtype=torch.uint8)  # no zeros
    out = random_crop_flip(x, gen(12))
    assert out.shape == x.shape and out.dtype == torch.uint8
    m = _crop_matches(x, out, 4)
    assert torch.all(m.flatten(1).sum(1) == 1)       # exactly one (offset, flip) per image
    assert m.any(3).any(0).all()                     # all 81 offsets occur (~12 each)
    assert abs(m[..., 1].sum().item() / 1000 - 0.5) < 0.08
    assert torch.equal(out, random_crop_flip(x, gen(12)))
    m = _crop_matches(x, random_crop_flip(x, gen(13), 2, flip=False), 2)
    assert torch.all(m.flatten(1).sum(1) == 1) and not m[..., 1].any() and m[..., 0].any(0).all()


# ---------------------------------------------------------------- AutoAugment
def _reference_one(img, draw, i):
    """torchvision's own per-op code applied to one image with our draws."""
    steps = CIFAR10_POLICY[int(draw.policy[i])]
    space = tv_aa.AutoAugment()._augmentation_space(10, (img.shape[-2], img.shape[-1]))
    fill = [128.0] * img.shape[0]
    for j, (op, _, bin_) in enumerate(steps):
        if not draw.applied[i, j]:
            continue
        mags, signed = space[op]
        mag = float(mags[bin_].item()) if bin_ is not None else 0.0
        if signed and not draw.positive[i, j]:
            mag = -mag
        img = tv_aa._apply_op(img, op, mag, interpolation=InterpolationMode.NEAREST, fill=fill)
    return img


@pytest.mark.parametrize("channels", [3, 1])
def test_auto_augment_matches_torchvision_per_image(channels):
    g = gen(13)
    x = torch.randint(0, 256, (100, channels, 12, 12), generator=g, dtype=torch.uint8)
    random_draw = draw_auto_augment(100, gen(14))
    # every sub-policy with both steps on, under all four sign combinations
    signs = torch.tensor([[True, True], [False, False], [True, False], [False, True]])
    forced = AutoAugmentDraw(policy=torch.arange(25).repeat_interleave(4),
                             applied=torch.ones(100, 2, dtype=torch.bool), positive=signs.repeat(25, 1))
    for draw in (random_draw, forced):
        out = apply_auto_augment(x, draw)
        for i in range(100):
            assert torch.equal(out[i], _reference_one(x[i], draw, i)), f"image {i}"


def test_auto_augment_per_image_policy_seeded_and_untouched():
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=gen(15), dtype=torch.uint8)
    out, draw = auto_augment(x, gen(16), return_draw=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert len(set(draw.policy.tolist())) > 5
    assert torch.equal(out, auto_augment(x, gen(16)))
    idle = ~draw.applied.any(1)
    assert idle.sum() > 0 and torch.equal(out[idle], x[idle])
    one = auto_augment(x[:, :1].contiguous(), gen(16))
    assert one.shape == (64, 1, 32, 32) and one.dtype == torch.uint8


def test_auto_augment_forced_draw_changes_image():
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=gen(17), dtype=torch.uint8)
    # sub-policy 1: Rotate(bin 2) then TranslateX(bin 9); both applied, opposite signs
    draw = AutoAugmentDraw(policy=torch.tensor([1, 1]), applied=torch.ones(2, 2, dtype=torch.bool),
                           positive=torch.tensor([[True, True], [False, False]]))
    out = apply_auto_augment(x, draw)
    assert not torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])
    with pytest.raises(KdprobeError):
        auto_augment(x.float(), gen(0))
    with pytest.raises(KdprobeError):
        auto_augment(x, gen(0), policy="imagenet")
