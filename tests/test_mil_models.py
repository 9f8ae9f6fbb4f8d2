"""MIL models: any bag size, attention is a distribution, the registry takes new models, and ABMIL and
TransMIL learn a toy witness-instance problem that mean pooling dilutes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dirl.errors import ConfigError
from dirl.mil import models
from dirl.mil.data import Bags
from dirl.mil.train import MilSettings, _evaluate, train_fold


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from dirl.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("n", [1, 2, 17, 300])
def test_any_bag_size(name, n):
    torch.manual_seed(0)
    m = models.build(name, 24, 3).eval()
    with torch.no_grad():
        logits, a = m(torch.randn(n, 24))
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    assert a.shape == (n,) and (a >= 0).all() and float(a.sum()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("n", [1, 2, 31, 33, 300])
def test_transmil_nystrom_any_bag_size(n):
    torch.manual_seed(0)
    m = models.build("transmil", 24, 2, hidden=64, attention="nystrom").eval()  # 32 landmarks
    with torch.no_grad():
        logits, a = m(torch.randn(n, 24))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert a.shape == (n,) and (a >= 0).all() and float(a.sum()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ConfigError, match="choose 'exact' or 'nystrom'"):
        models.build("transmil", 24, 2, attention="linear")


def test_registry_takes_new_models():
    with pytest.raises(ConfigError, match="unknown MIL model 'nope'"):
        models.build("nope", 8, 2)

    @models.register("maxpool_test")
    class MaxPool(torch.nn.Module):
        def __init__(self, in_dim, n_classes, **_):
            super().__init__()
            self.fc = torch.nn.Linear(in_dim, n_classes)

        def forward(self, x):
            s = self.fc(x)
            i = s.max(1).values.argmax()
            return s[i], torch.nn.functional.one_hot(i, len(x)).float()

    try:
        logits, a = models.build("maxpool_test", 8, 2)(torch.randn(5, 8))
        assert logits.shape == (2,) and a.sum() == 1
    finally:
        models.MODELS.pop("maxpool_test")


def toy_bags(n_bags=48, dim=32, seed=0, shift=3.0):
    """Bags of 20-80 noise instances; positive bags hold 3-6 witnesses shifted along one direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    cache, y, witness = {}, {}, {}
    for i in range(n_bags):
        n = int(rng.integers(20, 81))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        w = np.zeros(n, bool)
        label = i % 2
        if label:
            w[rng.choice(n, int(rng.integers(3, 7)), replace=False)] = True
            x[w] += shift * direction.astype(np.float32)
        sid = f"b{i:02d}"
        cache[sid], y[sid], witness[sid] = x, label, w
    bags = Bags(paths={}, n_tiles={s: len(x) for s, x in cache.items()}, dim=dim, encoder="toy", _cache=cache)
    return bags, y, witness


# TransMIL needs far more bags than ABMIL to generalise in 32 noisy dimensions; its toy is lower-dimensional
@pytest.mark.parametrize("name,epochs,dim,shift", [("abmil", 30, 32, 3.0), ("transmil", 15, 8, 6.0)])
def test_models_learn_witness_instances(name, epochs, dim, shift):
    bags, y, witness = toy_bags(dim=dim, shift=shift)
    ids = sorted(y)
    train, val, test = ids[:28], ids[28:36], ids[36:]
    cfg = MilSettings(epochs=epochs, patience=10, lr=5e-4, seed=0)
    model, info = train_fold(name, bags, train, val, y, 2, cfg, torch.device("cpu"))
    assert info["best_epoch"] >= 0 and info["steps"] > 0
    prob, _, attn = _evaluate(model, lambda s: torch.from_numpy(bags.features(s)), test, y, None, want_attention=True)
    acc = float(np.mean(prob.argmax(1) == np.array([y[s] for s in test])))
    assert acc >= 0.9, (name, acc, info["history"][-3:])
    # attention on the witnesses of positive bags: their share of the mass over their share of the bag
    share = [attn[s][witness[s]].sum() / witness[s].mean() for s in test if y[s] == 1]
    assert np.median(share) > 3, share


def test_bags_per_step_and_max_tiles_run():
    bags, y, _ = toy_bags(n_bags=12)
    ids = sorted(y)
    cfg = MilSettings(epochs=2, bags_per_step=4, max_tiles=10, seed=0)
    _, info = train_fold("abmil", bags, ids[:8], ids[8:], y, 2, cfg, torch.device("cpu"))
    assert info["steps"] == 2 * 2  # 8 bags in steps of 4, two epochs


def test_class_weights_weigh_each_bag():
    """Imbalanced training labels (9 of class 0, 1 of class 1): weights n / (k count) = [10/18, 5].
    Each bag's loss is its class weight times its cross-entropy (hand computed); the validation loss
    is the class-weighted mean. (CrossEntropyLoss(weight=w) on one bag would cancel the weight.)"""
    import math

    from dirl.mil.train import WeightedBagLoss, class_weights

    w = class_weights(np.array([0] * 9 + [1]), 2)
    assert w.tolist() == pytest.approx([10 / 18, 5.0])
    loss = WeightedBagLoss(w, torch.device("cpu"))
    logits = torch.tensor([2.0, 0.0])
    ce1 = -math.log(math.exp(0.0) / (math.exp(2.0) + 1.0))  # cross-entropy of target 1
    ce0 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert float(loss(logits, 1)) == pytest.approx(5.0 * ce1, rel=1e-6)
    assert float(loss(logits, 0)) == pytest.approx(10 / 18 * ce0, rel=1e-6)
    unweighted = torch.nn.functional.cross_entropy(logits[None], torch.tensor([1]))
    assert float(
        torch.nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32))(logits[None], torch.tensor([1]))
    ) == pytest.approx(float(unweighted))  # the bug this replaces
    assert loss.mean([ce0, ce1], [0, 1]) == pytest.approx((10 / 18 * ce0 + 5 * ce1) / (10 / 18 + 5))
