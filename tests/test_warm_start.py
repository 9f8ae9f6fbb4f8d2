"""Warm start (`pretrain.init`): weights a lab already has — a timm state dict (an ImageNet classifier, its
head dropped), a facebookresearch/dino checkpoint, an earlier run — become the student's and the
teacher's starting point, key by key; anything that does not fit is refused in one line naming both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_toy import TINY_PRETRAIN, TINY_SETTINGS, write_toy_cohort

from dirl.cli import main as cli
from dirl.errors import ConfigError
from dirl.runtime import resolve_device
from dirl.ssl import init
from dirl.ssl.settings import PretrainSettings
from dirl.ssl.trainer import Trainer

ARCH = TINY_SETTINGS["arch"]


def timm_classifier(seed: int, arch: str = ARCH, img_size: int = 224):
    """An ImageNet-shaped timm ViT (1000-class head, 224 px position embedding), random weights of `seed`."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=1000, img_size=img_size)


def trainer(path: Path | None, method: str = "dirl") -> Trainer:
    s = PretrainSettings(**{**TINY_SETTINGS, "method": method, "init": str(path) if path else None}).validate()
    return Trainer(s, n_classes=4, device=resolve_device("cpu"))


def test_a_timm_state_dict_starts_student_and_teacher(tmp_path):
    model = timm_classifier(seed=3)
    path = tmp_path / "vit_tiny_imagenet.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    t = trainer(path)
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    for net in (t.student, t.teacher):
        got = net.backbone.state_dict()
        assert set(got) == set(want)
        for k, v in want.items():
            if k == "pos_embed":  # 14 x 14 grid resampled to the 64 px crops' 4 x 4, class token kept
                assert got[k].shape == (1, 1 + 16, v.shape[-1]) and torch.equal(got[k][:, 0], v[:, 0])
            else:
                assert torch.equal(got[k], v), k
    fresh = trainer(None)
    assert not torch.equal(
        fresh.student.backbone.blocks[0].attn.qkv.weight, t.student.backbone.blocks[0].attn.qkv.weight
    )
    assert t.init.kind == "weights file" and t.init.digest.startswith("sha256:") and not t.init.heads


def test_a_dino_checkpoint_starts_from_its_teacher_with_its_heads(tmp_path):
    """facebookresearch/dino's layout: `module.backbone.*` and `module.head.*` (weight-normed last layer)."""
    source = trainer(None, method="dino")
    with torch.no_grad():
        for p in source.teacher.parameters():
            p.add_(0.01)

    def dino_layout(net):
        sd = {}
        for k, v in net.state_dict().items():
            if k.startswith("head.last_layer.weight"):  # DINO keeps the direction and the norm apart
                sd["module.head.last_layer.weight_g"] = torch.ones(v.shape[0], 1)
                sd["module.head.last_layer.weight_v"] = v
            else:
                sd[f"module.{k}"] = v
        return sd

    path = tmp_path / "checkpoint.pth"
    torch.save({"student": dino_layout(source.student), "teacher": dino_layout(source.teacher), "epoch": 100}, path)
    t = trainer(path, method="dino")
    assert t.init.kind == "dino checkpoint" and t.init.heads.keys() == {"head"}
    for k, v in source.teacher.backbone.state_dict().items():
        assert torch.equal(t.student.backbone.state_dict()[k], v), k  # the teacher's weights, DINO's better model
    assert torch.equal(t.teacher.head.mlp[0].weight, source.teacher.head.mlp[0].weight)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: timm_classifier(0, arch="vit_small_patch16_224").state_dict(), "does not fit a vit_tiny_patch16_224"),
        (lambda: {k: v for k, v in timm_classifier(0).state_dict().items() if "blocks.11." not in k}, "missing"),
        (lambda: {**timm_classifier(0).state_dict(), "blocks.12.norm1.weight": torch.ones(192)}, "unexpected"),
    ],
)
def test_weights_that_do_not_fit_are_refused_naming_file_and_keys(tmp_path, make, message):
    path = tmp_path / "weights.pth"
    torch.save(make(), path)
    with pytest.raises(ConfigError, match=message) as e:
        trainer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_run_of_another_architecture_is_refused_at_start_up(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(timm_classifier(0, arch="vit_small_patch16_224").state_dict(), run / "backbone.pt")
    (run / "backbone.json").write_text(json.dumps({"arch": "vit_small_patch16_224"}))
    with pytest.raises(ConfigError, match="is a vit_small_patch16_224 backbone, pretrain.arch is vit_tiny"):
        trainer(run)
    for bad, message in ((tmp_path / "none.pth", "no such file"), (run / "backbone.json", "not a weights file")):
        with pytest.raises(ConfigError, match=message):
            init.resolve(bad)


def test_a_warm_started_run_records_its_source_and_refuses_to_resume_from_other_weights(tmp_path):
    tiles, priors = write_toy_cohort(tmp_path / "cohort", n_slides=2, n_tiles=8, tile_px=64)
    data = ["--tiles", *map(str, tiles), "--priors", *map(str, priors)]
    args = [*TINY_PRETRAIN, "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli(["pretrain", str(first), *data, *args, "--method", "dino"]) == 0
    assert cli(["pretrain", str(second), *data, *args, "--method", "dirl", "--init", str(first)]) == 0
    meta = json.loads((second / "backbone.json").read_text())
    assert meta["init"]["source"] == str(first / "backbone.pt") and meta["init"]["kind"] == "dirl run"
    assert meta["init"]["digest"].startswith("sha256:")
    ck = torch.load(second / "checkpoint.pt", weights_only=False)
    assert ck["init"] == meta["init"]
    other = tmp_path / "other.pth"
    torch.save(timm_classifier(1).state_dict(), other)
    assert cli(["pretrain", str(second), *data, *args, "--method", "dirl", "--init", str(other)]) == 1
