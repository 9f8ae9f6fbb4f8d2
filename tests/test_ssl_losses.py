"""DINO and DiRL losses against hand-computed values on tiny tensors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dirl.ssl.augment import Geometry, orient
from dirl.ssl.losses import DenseLoss, DINOLoss, mask_occupancy, pool_classes, token_occupancy, valid_classes


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_dino_loss_hand_computed():
    # 2 global views, 1 image, 3 outputs; centre 0; teacher temp 0.5, student temp 0.1
    t = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])
    s = torch.tensor([[[0.1, 0.2, 0.3]], [[0.3, 0.2, 0.1]]])
    loss = DINOLoss(3, student_temp=0.1)(s, t, teacher_temp=0.5)
    q0, q1 = _softmax(np.array([2.0, 0, 0])), _softmax(np.array([0, 4.0, 0]))
    ls0 = np.log(_softmax(np.array([1.0, 2, 3])))
    ls1 = np.log(_softmax(np.array([3.0, 2, 1])))
    expected = (-(q0 * ls1).sum() - (q1 * ls0).sum()) / 2  # teacher view a vs student view b != a
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_matches_loop_with_local_crops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    crit = DINOLoss(7)
    crit.center.copy_(torch.randn(1, 7, generator=g))
    c = crit.center.clone()
    loss = crit(s, t, 0.04)
    total, n = 0.0, 0
    for iq in range(2):
        q = torch.softmax((t[iq] - c) / 0.04, -1)
        for v in range(4):
            if v != iq:
                total += (-(q * torch.log_softmax(s[v] / 0.1, -1)).sum(-1)).mean()
                n += 1
    assert loss.item() == pytest.approx((total / n).item(), rel=1e-5)


def test_centring_ema():
    crit = DINOLoss(2, center_momentum=0.9)
    t = torch.tensor([[[1.0, 3.0], [3.0, 5.0]], [[2.0, 0.0], [2.0, 0.0]]])  # mean over views+images: 2, 2
    crit(torch.zeros(2, 2, 2), t, 0.1)
    assert crit.center[0].tolist() == pytest.approx([0.2, 0.2])
    crit(torch.zeros(2, 2, 2), t, 0.1)
    assert crit.center[0].tolist() == pytest.approx([0.9 * 0.2 + 0.2] * 2)
    # the loss uses the centre from before the update (test_dino_loss_matches_loop_with_local_crops)


def test_token_occupancy_and_mask():
    m = torch.tensor([[[0, 0, 1, 2], [0, 1, 1, 2], [3, 3, 3, 3], [3, 3, 0, 3]]])
    p = token_occupancy(m, 4, 2)  # tokens row-major: TL, TR, BL, BR
    assert p.shape == (1, 4, 4)
    assert p[0, 0].tolist() == [0.75, 0.25, 0, 0]
    assert p[0, 1].tolist() == [0, 0.5, 0.5, 0]
    assert p[0, 2].tolist() == [0, 0, 0, 1]
    assert p[0, 3].tolist() == [0.25, 0, 0, 0.75]
    mask = torch.zeros(1, 4, 4)
    mask[:, :, 1:] = 1
    assert mask_occupancy(mask, 2)[0].tolist() == [0.5, 1, 0.5, 1]


def test_token_occupancy_is_the_pooled_one_hot():
    m = torch.randint(0, 6, (3, 48, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = F.avg_pool2d(F.one_hot(m.long(), 6).permute(0, 3, 1, 2).float(), 16).flatten(2).transpose(1, 2)
    assert torch.equal(token_occupancy(m, 6, 16), ref)
    with pytest.raises(ValueError, match="class 5 but n_classes = 5"):
        token_occupancy(m.clamp(max=5), 5, 16)


def test_masked_pooling_hand_computed():
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])  # (1, N=4, D=2)
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 0.0]]])  # (1, N, C=2)
    z, mass = pool_classes(h, p)
    assert mass.tolist() == [[1.5, 1.5]]
    assert z[0, 0].tolist() == pytest.approx([1 / 1.5, 0.5 / 1.5])
    assert z[0, 1].tolist() == pytest.approx([2 / 1.5, 2.5 / 1.5])
    z0, m0 = pool_classes(h, torch.zeros(1, 4, 2))  # absent class: zero vector, zero mass
    assert z0.abs().sum() == 0 and m0.sum() == 0


def test_valid_classes_matching():
    mass = torch.tensor(
        [
            [[5.0, 2.0, 0.5, 3.0]],  # view 0
            [[4.0, 0.0, 2.0, 1.0]],
        ]
    )  # view 1
    v = valid_classes(mass, min_tokens=1.0, exclude=(0,))
    assert v.tolist() == [[False, False, False, True]]  # 0 excluded, 1 missing in view 1, 2 too small in 0
    assert valid_classes(mass, 1.0, ()).tolist() == [[True, False, False, True]]


def test_dense_loss_only_valid_entries_count():
    torch.manual_seed(0)
    b, c, k = 2, 3, 5
    s, t = torch.randn(2, b, c, k), torch.randn(2, b, c, k)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    crit = DenseLoss(k, student_temp=0.1, center_momentum=0.9)
    loss, n = crit(s, t, valid, 0.04)
    entries = []
    for i in range(b):
        for j in range(c):
            if valid[i, j]:
                for a in range(2):
                    q = torch.softmax(t[a, i, j] / 0.04, -1)
                    entries.append(-(q * torch.log_softmax(s[1 - a, i, j] / 0.1, -1)).sum())
    assert n.item() == 3
    assert loss.item() == pytest.approx(torch.stack(entries).mean().item(), rel=1e-5)
    # the centre moves towards the mean of the valid teacher outputs only
    mean_valid = torch.stack([t[a, i, j] for i in range(b) for j in range(c) if valid[i, j] for a in range(2)]).mean(0)
    assert crit.center[0].tolist() == pytest.approx((0.1 * mean_valid).tolist(), rel=1e-5)
    # invalid entries can hold anything (a class missing in one view): the loss does not change
    s2, t2 = s.clone(), t.clone()
    s2[:, ~valid] = 1e4
    t2[:, ~valid] = -1e4
    loss2, _ = DenseLoss(k)(s2, t2, valid, 0.04)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)


def test_dense_loss_without_valid_entries():
    crit = DenseLoss(4)
    crit.center.fill_(0.3)
    s = torch.randn(2, 2, 3, 4, requires_grad=True)
    loss, n = crit(s, torch.randn(2, 2, 3, 4), torch.zeros(2, 3, dtype=torch.bool), 0.04)
    assert loss.item() == 0 and n.item() == 0
    loss.backward()  # still differentiable (zero gradient)
    assert s.grad.abs().sum() == 0
    assert torch.allclose(crit.center, torch.full((1, 4), 0.3))


@pytest.mark.parametrize("hflip,vflip,rot", [(a, b, r) for a in (0, 1) for b in (0, 1) for r in range(4)])
def test_pooling_invariant_to_flips_and_rotations(hflip, vflip, rot):
    """Transforming the image and the map together permutes tokens and occupancy alike, so class
    representations are unchanged (for a backbone equivariant to the transform, as here by design)."""
    g = torch.Generator().manual_seed(1)
    patch, grid, d, c = 4, 4, 6, 5
    pm = torch.randint(0, c, (grid * patch, grid * patch), generator=g)
    feat = torch.randn(d, grid, grid, generator=g)  # token features on the grid
    geo = Geometry(0, 0, grid * patch, grid * patch, bool(hflip), bool(vflip), rot)

    def pooled(m, f):
        p = token_occupancy(m[None], c, patch)
        return pool_classes(f.flatten(1).T[None], p)

    z, mass = pooled(pm, feat)
    z2, mass2 = pooled(orient(pm, geo), orient(feat, geo))
    assert torch.allclose(mass, mass2)
    assert torch.allclose(z, z2, atol=1e-6)
    # and the occupancy grid itself transforms like the image
    occ = token_occupancy(pm[None], c, patch)[0].T.reshape(c, grid, grid)
    occ2 = token_occupancy(orient(pm, geo)[None], c, patch)[0].T.reshape(c, grid, grid)
    assert torch.allclose(orient(occ, geo), occ2)


def test_dino_loss_uniform_limit():
    # identical uniform student and teacher: cross-entropy = log K
    k = 8
    loss = DINOLoss(k)(torch.zeros(2, 3, k), torch.zeros(2, 3, k), 0.04)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)
