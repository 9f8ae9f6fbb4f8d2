"""Paired views: geometry shared by image and prior map, determinism, crop boxes and their overlap."""

import numpy as np
import pytest
import torch

from dirl.ssl.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Geometry,
    ViewSpec,
    _gaussian_blur,
    apply_geometry,
    make_view,
    overlap_mask,
    overlap_occupancy,
    photometric,
    view_rng,
)


def _class_image(tile=64, seed=0):
    """Image whose red channel encodes the class of each 8x8 block, and the matching prior map."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, (tile // 8, tile // 8))
    prior = np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    img = np.zeros((tile, tile, 3), np.uint8)
    img[..., 0] = prior * 60 + 20
    img[..., 1] = 128
    return torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(prior)


def _denorm_red(v):
    return (v[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255


@pytest.mark.parametrize("index", range(6))
def test_geometry_applied_to_image_and_map_together(index):
    img, prior = _class_image()
    spec = ViewSpec(32, (0.3, 1.0))
    v, pm, g = make_view(img, prior, view_rng(0, 0, index, 0), spec, photometric_ops=False)
    cls_from_img = np.rint((_denorm_red(v).numpy() - 20) / 60).clip(0, 3)
    agree = (cls_from_img == pm.numpy()).mean()
    assert agree > 0.9, (agree, g)  # only block borders can disagree (bilinear vs nearest)
    assert pm.dtype == torch.uint8 and set(np.unique(pm.numpy())) <= set(range(4))


def test_views_are_a_function_of_seed_epoch_index():
    img, prior = _class_image()
    spec = ViewSpec(32, (0.3, 1.0), solarize_p=0.5)
    a = make_view(img, prior, view_rng(3, 1, 5, 0), spec)
    b = make_view(img, prior, view_rng(3, 1, 5, 0), spec)
    c = make_view(img, prior, view_rng(3, 2, 5, 0), spec)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])


def test_photometric_ops_leave_the_map_and_geometry_alone():
    img, prior = _class_image()
    spec = ViewSpec(32, (0.3, 1.0))
    v1, p1, g1 = make_view(img, prior, view_rng(0, 0, 1, 0), spec, photometric_ops=True)
    v2, p2, g2 = make_view(img, prior, view_rng(0, 0, 1, 0), spec, photometric_ops=False)
    assert g1 == g2 and torch.equal(p1, p2)
    assert not torch.allclose(v1, v2)


def test_photometric_range_and_hed_identity():
    x = torch.rand(3, 16, 16) * 0.9 + 0.05
    none = ViewSpec(16, (1, 1), blur_p=0, jitter_p=0, grey_p=0, hed_p=0)
    assert torch.equal(photometric(x, np.random.default_rng(0), none), x)
    hed0 = ViewSpec(16, (1, 1), blur_p=0, jitter_p=0, grey_p=0, hed_p=1.0, hed_sigma=1e-9)
    assert torch.allclose(photometric(x, np.random.default_rng(0), hed0), x, atol=1e-4)
    every = ViewSpec(16, (1, 1), blur_p=1, jitter_p=1, grey_p=1, hed_p=1, solarize_p=1)
    y = photometric(x, np.random.default_rng(0), every)
    assert y.min() >= 0 and y.max() <= 1 and torch.allclose(y[0], y[1])  # greyscale


def test_overlap_mask_of_known_boxes():
    # 48-px tile, view a = top-left 32x32, view b = bottom-right 32x32: they share [16, 32)^2
    a = Geometry(0, 0, 32, 32, False, False, 0)
    b = Geometry(16, 16, 32, 32, False, False, 0)
    ma, mb = overlap_mask(a, b, 32), overlap_mask(b, a, 32)
    exp_a = torch.zeros(32, 32)
    exp_a[16:, 16:] = 1
    exp_b = torch.zeros(32, 32)
    exp_b[:16, :16] = 1
    assert torch.equal(ma, exp_a) and torch.equal(mb, exp_b)
    # flips / rotations move the mask with the view
    af = Geometry(0, 0, 32, 32, True, False, 1)
    assert torch.equal(overlap_mask(af, b, 32), torch.rot90(exp_a.flip(-1), 1, (-2, -1)))
    # resizing: a 32-px box drawn at 16 px keeps the proportion
    assert overlap_mask(a, b, 16).sum() == 64


def test_overlap_occupancy_is_the_pooled_mask():
    from dirl.ssl.losses import mask_occupancy

    rng = np.random.default_rng(0)
    for _ in range(50):
        g, o = (
            Geometry(*rng.integers(0, 40, 2), *rng.integers(8, 60, 2), *rng.random(2) < 0.5, int(rng.integers(4)))
            for _ in range(2)
        )
        mask = overlap_mask(g, o, 48)
        assert torch.allclose(overlap_occupancy(g, o, 48, 16), mask_occupancy(mask[None], 16)[0], atol=1e-6)


def test_uint8_resize_matches_the_float_one():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).permute(2, 0, 1)
    g = Geometry(5, 3, 41, 50, True, False, 1)
    fast = apply_geometry(img, g, 32, "bilinear")
    exact = apply_geometry(img.float(), g, 32, "bilinear")
    assert fast.dtype == torch.uint8 and (fast.float() - exact).abs().max() <= 1.0


def test_blur_is_a_gaussian_per_channel():
    x = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    x[1] = 0.5  # a flat channel stays flat; the others do not leak into it
    y = _gaussian_blur(x, 1.5)
    assert torch.allclose(y[1], torch.full_like(y[1], 0.5), atol=1e-6)
    assert torch.allclose(y.mean((1, 2)), x.mean((1, 2)), atol=0.01) and y[0].std() < 0.6 * x[0].std()
    k = torch.exp(-0.5 * (torch.arange(-5, 6.0) / 1.5) ** 2)
    k = k / k.sum()
    rows = torch.stack([(x[0, r, 15:26] * k).sum() for r in range(15, 26)])  # rows then columns, at (20, 20)
    assert torch.allclose(y[0, 20, 20], (rows * k).sum(), atol=1e-5)


def test_overlap_mask_selects_the_same_tissue_in_both_views():
    tile = 48
    ys, xs = np.mgrid[:tile, :tile]
    coded = torch.from_numpy((ys * tile + xs).astype(np.float32))[None]  # unique value per pixel
    a = Geometry(2, 5, 30, 30, True, False, 3)
    b = Geometry(10, 0, 30, 30, False, True, 1)
    va = apply_geometry(coded, a, 30, "nearest")[0]
    vb = apply_geometry(coded, b, 30, "nearest")[0]
    sa = set(va[overlap_mask(a, b, 30).bool()].long().tolist())
    sb = set(vb[overlap_mask(b, a, 30).bool()].long().tolist())
    assert sa == sb and len(sa) == (30 - 8) * (30 - 5)  # rows 10..31, cols 5..29


def test_hue_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from dirl.ssl.augment import _adjust_hue

    x = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    for shift in (-0.1, 0.03, 0.25):
        assert torch.allclose(_adjust_hue(x, shift), tvf.adjust_hue(x, shift), atol=1e-5)
