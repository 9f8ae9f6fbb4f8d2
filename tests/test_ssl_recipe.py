"""The DINO baseline follows DINO's recipe (facebookresearch/dino, main_dino.py and utils.py): one
`Trainer.step` equals a step written the way the reference writes it (Python loops over views and
parameters), and each ingredient does what it should on its own: EMA, per-parameter clipping, the frozen
last layer, parameter groups, centring and sharpening, the glass exclusion of the dense term."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dirl.ssl.settings import PretrainSettings
from dirl.ssl.trainer import Trainer, clip_per_parameter, param_groups

TINY = dict(
    arch="vit_tiny_patch16_224",
    img_size=32,
    out_dim=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    drop_path=0.0,
    warmup_epochs=0,
    epochs=2,
    batch_size=4,
    lr=0.05,
    clip_grad=0.3,
    momentum_teacher=0.9,
    method="dino",
    local_crops_number=2,
    local_crop_size=16,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"global": torch.randn(b, 2, 3, 32, 32, generator=g), "local": torch.randn(b, 2, 3, 16, 16, generator=g)}


def reference_step(student, teacher, center, opt, images, sch, s: PretrainSettings, epoch: int, grads_from=None):
    """One iteration of DINO's train_one_epoch, with its DINOLoss, clip_gradients,
    cancel_gradients_last_layer and EMA, written as the reference writes them. `grads_from(student)`,
    if given, is called just before the optimiser step (to compare or replace the gradients)."""
    for g in opt.param_groups:
        g["lr"] = sch["lr"]
        if g["regularized"]:
            g["weight_decay"] = sch["wd"]
    with torch.no_grad():
        teacher_output = teacher(images[:2])
    student_output = student(images)
    # DINOLoss.forward
    student_out = (student_output / s.student_temp).chunk(len(images))
    teacher_out = F.softmax((teacher_output - center) / sch["teacher_temp"], dim=-1).detach().chunk(2)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    loss = total / n_terms
    new_center = center * s.center_momentum + teacher_output.mean(0, keepdim=True) * (1 - s.center_momentum)
    opt.zero_grad()
    loss.backward()
    for _, p in student.named_parameters():  # utils.clip_gradients
        if p.grad is not None:
            clip_coef = s.clip_grad / (p.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    if epoch < s.freeze_last_layer:  # utils.cancel_gradients_last_layer
        for n, p in student.named_parameters():
            if "last_layer" in n:
                p.grad = None
    if grads_from is not None:
        grads_from(student)
    opt.step()
    with torch.no_grad():
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(sch["momentum"]).add_((1 - sch["momentum"]) * param_q.detach().data)
    return loss.item(), new_center


class Flat(torch.nn.Module):
    """The reference's MultiCropWrapper view of an SSLNet: a list of crops in, head outputs out."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, crops):
        glob = torch.stack(crops[:2])
        loc = torch.stack(crops[2:]) if len(crops) > 2 else None
        return self.net(glob, loc)["out"].flatten(0, 1)


@pytest.mark.parametrize("epoch", [0, 1])
def test_step_equals_dino_reference(epoch):
    """Same loss, centre and gradients (after clipping and the freeze); then, from the same gradients
    (Adam turns float round-off in near-zero gradients into visible steps), the same parameters."""
    s = PretrainSettings(**TINY)
    tr = Trainer(s, None, torch.device("cpu"), iters_per_epoch=4)
    student, teacher = copy.deepcopy(tr.student), copy.deepcopy(tr.teacher)
    opt = torch.optim.AdamW(param_groups(student), lr=0.0)
    ours: dict[str, torch.Tensor | None] = {}
    step_opt = tr.opt.step

    def capture(*a, **k):
        ours.update({n: None if p.grad is None else p.grad.clone() for n, p in tr.student.named_parameters()})
        return step_opt(*a, **k)

    tr.opt.step = capture

    def compare_and_adopt(ref) -> None:
        for n, p in ref.net.named_parameters():
            if p.grad is None or ours[n] is None:
                assert p.grad is None and ours[n] is None, n  # frozen in both, or in neither
                continue
            scale = p.grad.abs().max().item() + 1e-12
            assert (p.grad - ours[n]).abs().max().item() < 1e-4 * scale, (
                n,
                (p.grad - ours[n]).abs().max().item(),
                scale,
            )
            p.grad.copy_(ours[n])

    for i in range(2):  # two steps: the second sees a moved centre and Adam state
        b = batch(seed=i)
        step = epoch * 4 + i
        sch = tr.schedule(step, epoch)
        images = [b["global"][:, 0], b["global"][:, 1], b["local"][:, 0], b["local"][:, 1]]
        center = tr.dino_loss.center.clone()
        m = tr.step(b, step, epoch)
        ref_loss, center = reference_step(
            Flat(student), Flat(teacher), center, opt, images, sch, s, epoch, grads_from=compare_and_adopt
        )
        assert m["loss_dino"] == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(tr.dino_loss.center, center, rtol=1e-5, atol=1e-7)
        for (n, a), bb in zip(tr.student.named_parameters(), student.parameters()):
            torch.testing.assert_close(a, bb, rtol=1e-6, atol=1e-7, msg=n)
        for (n, a), bb in zip(tr.teacher.named_parameters(), teacher.parameters()):
            torch.testing.assert_close(a, bb, rtol=1e-6, atol=1e-7, msg=n)
    frozen = ours["head.last_layer.weight"] is None
    assert frozen == (epoch == 0)


def test_last_layer_frozen_in_the_first_epoch_then_learns():
    s = PretrainSettings(**TINY)
    tr = Trainer(s, None, torch.device("cpu"), iters_per_epoch=4)
    last = tr.student.head.last_layer.weight
    before = last.detach().clone()
    tr.step(batch(), 0, 0)
    assert torch.equal(last, before)  # no gradient, no Adam step, no weight decay
    tr.step(batch(seed=1), 4, 1)
    assert not torch.equal(last, before)  # gradients reach it after the freeze


def test_ema_moves_the_teacher_by_one_minus_momentum():
    s = PretrainSettings(**{**TINY, "lr": 0.0, "min_lr": 0.0, "weight_decay": 0.0, "weight_decay_end": 0.0})
    tr = Trainer(s, None, torch.device("cpu"), iters_per_epoch=4)
    with torch.no_grad():
        for p in tr.student.parameters():
            p.add_(1.0)  # the student is ahead of the teacher by exactly 1 everywhere
    t0 = [p.detach().clone() for p in tr.teacher.parameters()]
    m = tr.step(batch(), 4, 1)["momentum"]  # lr 0: the student does not move
    for a, b in zip(tr.teacher.parameters(), t0):
        torch.testing.assert_close(a, b + (1 - m), rtol=0, atol=1e-6)
    assert 0.9 < m < 1


def test_per_parameter_clipping():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5: clipped to 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5: untouched (a global clip would shrink it)
    clip_per_parameter([a, b], 1.0)
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert b.grad.tolist() == pytest.approx([0.3, 0.4])


def test_no_weight_decay_on_biases_and_norms():
    tr = Trainer(PretrainSettings(**TINY), None, torch.device("cpu"))
    names = {id(p): n for n, p in tr.student.named_parameters()}
    reg, no_reg = tr.opt.param_groups
    assert reg["regularized"] and not no_reg["regularized"] and no_reg["weight_decay"] == 0.0
    assert all(not (names[id(p)].endswith(".bias") or p.ndim == 1) for p in reg["params"])
    assert {names[id(p)] for p in no_reg["params"]} >= {"backbone.norm.weight", "head.mlp.0.bias"}
    assert "backbone.cls_token" in {names[id(p)] for p in reg["params"]}  # 3-d: decayed, as in DINO
    tr.schedule(0, 0)
    tr.step(batch(), 0, 0)
    assert reg["weight_decay"] == pytest.approx(tr.schedule(0, 0)["wd"])


def test_teacher_targets_are_sharper_than_the_student_and_monitored():
    s = PretrainSettings(**TINY)
    tr = Trainer(s, None, torch.device("cpu"))
    m = tr.step(batch(), 0, 0)
    # fractions of ln K, and the KL is what is left of the cross-entropy after the teacher's entropy
    assert 0 < m["teacher_entropy"] <= 1 and 0 < m["teacher_batch_entropy"] <= 1
    assert m["kl"] == pytest.approx(m["loss_dino"] - m["teacher_entropy"] * math.log(s.out_dim))
    assert m["teacher_entropy"] <= m["teacher_batch_entropy"] + 1e-6  # mean of entropies <= entropy of mean


def test_collapse_is_recognised():
    tr = Trainer(PretrainSettings(**TINY), None, torch.device("cpu"))
    ln_k = math.log(64)
    uniform = {"teacher_entropy": 0.999, "teacher_batch_entropy": 1.0, "kl": 0.001 * ln_k}
    one_dim = {"teacher_entropy": 0.01, "teacher_batch_entropy": 0.05, "kl": 0.5}
    healthy = {"teacher_entropy": 0.6, "teacher_batch_entropy": 0.95, "kl": 0.4}
    assert "uniform" in tr.collapsed(uniform) and "one dimension" in tr.collapsed(one_dim)
    assert tr.collapsed(healthy) is None


@pytest.mark.parametrize("exclude", [True, False])
def test_glass_never_enters_the_dense_term(exclude):
    s = PretrainSettings(
        **{**TINY, "method": "dirl", "dense_out_dim": 32, "exclude_background": exclude, "local_crops_number": 0}
    )
    tr = Trainer(s, n_classes=3, device=torch.device("cpu"))
    b = batch()
    n = (32 // 16) ** 2
    occ = torch.zeros(4, 2, n, 3)
    occ[..., 0] = 1.0  # every token of both views is glass
    b.update(occupancy=occ, overlap=torch.ones(4, 2, n))
    m = tr.step(b, 0, 0)
    assert m["dense_pairs_per_image"] == (0.0 if exclude else 1.0)
    assert (m["loss_dense"] == 0.0) == exclude
