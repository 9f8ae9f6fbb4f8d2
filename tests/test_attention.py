"""Attention sparsity metrics on constructed maps, the attention hook, and `dirl attention` end to end."""

import json
import math

import pytest
import torch
from helpers_toy import TINY_SETTINGS, write_toy_cohort

from dirl.analysis.attention import (
    attention_metrics,
    attention_over_patches,
    class_share,
    last_layer_attention,
    sample_tiles,
)
from dirl.cli import main as cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared machine
    yield
    torch.set_num_threads(n)


def test_uniform_and_one_hot():
    n = 16
    m = attention_metrics(torch.full((n,), 1 / n))
    assert m["entropy"].item() == pytest.approx(1.0)
    assert m["gini"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["top50_share"].item() == 0.5 and m["top90_share"].item() == pytest.approx(15 / 16)
    one = torch.zeros(n)
    one[3] = 1
    m = attention_metrics(one)
    assert m["entropy"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["gini"].item() == pytest.approx(1.0)
    assert m["top50_share"].item() == m["top90_share"].item() == 1 / n


def test_metrics_of_a_known_distribution():
    a = torch.tensor([0.5, 0.25, 0.125, 0.125])
    m = attention_metrics(a)
    h = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
    assert m["entropy"].item() == pytest.approx(h / math.log(4))
    # Gini of (1/8, 1/8, 1/4, 1/2): sum_i (2i - n - 1) x_i / (n - 1)
    assert m["gini"].item() == pytest.approx((-3 / 8 - 1 / 8 + 1 / 4 + 3 / 2) / 3)
    assert m["top50_share"].item() == 0.25 and m["top90_share"].item() == 1.0  # 0.875 < 0.9
    # batched, unnormalised input is renormalised
    mb = attention_metrics(torch.stack([a * 3, torch.ones(4)]))
    assert mb["entropy"][0].item() == pytest.approx(h / math.log(4)) and mb["entropy"][1].item() == 1


def test_hook_attention_is_the_blocks_attention():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, dynamic_img_size=True).eval()
    attn_mod = model.blocks[-1].attn
    seen = {}
    attn_mod.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        a = last_layer_attention(model, x)
    assert a.shape == (2, 3, 7, 7) and torch.allclose(a.sum(-1), torch.ones(2, 3, 7))
    with torch.no_grad():  # attention @ v through the projection reproduces the block's output
        h = seen["x"]
        v = attn_mod.qkv(h).reshape(2, 7, 3, 3, 64).permute(2, 0, 3, 1, 4)[2]
        y = attn_mod.proj((a @ v).transpose(1, 2).reshape(2, 7, 192))
    assert torch.allclose(y, seen["out"], atol=1e-5)
    cls = attention_over_patches(a, 1, "cls")
    rec = attention_over_patches(a, 1, "received")
    assert cls.shape == rec.shape == (2, 3, 6)
    assert torch.allclose(cls.sum(-1), torch.ones(2, 3)) and torch.allclose(rec.sum(-1), torch.ones(2, 3))


def test_class_share_and_sampling():
    a = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])
    occ = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]]])
    assert class_share(a, occ)[0, 0].tolist() == [0.75, 0.25]
    picks = sample_tiles([10, 3, 0], 8, seed=0)
    assert len(picks) == 8 and len(set(picks)) == 8 and {s for s, _ in picks} == {0, 1}
    assert picks == sample_tiles([10, 3, 0], 8, seed=0)


def _fake_backbone(path, init, method, seed=0):
    import timm

    torch.manual_seed(init)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, dynamic_img_size=True)
    path.mkdir(parents=True)
    torch.save(m.state_dict(), path / "backbone.pt")
    (path / "backbone.json").write_text(
        json.dumps(
            {
                "arch": "vit_tiny_patch16_224",
                "img_size": 32,
                "patch_size": 16,
                "embed": "cls",
                "method": method,
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "settings": {"seed": seed},
            }
        )
    )
    return path / "backbone.pt"


def test_cli_compares_backbones_with_untrained_references(tmp_path):
    tiles, priors = write_toy_cohort(tmp_path / "c", n_slides=2, n_tiles=5, tile_px=64)
    runs = {
        f"{m}-s{seed}": _fake_backbone(tmp_path / "pretrain" / f"{m}-s{seed}", 10 * seed + i, m, seed)
        for seed in (0, 1)
        for i, m in enumerate(("dino", "dirl"))
    }
    out = tmp_path / "analysis" / "attention.json"
    rc = cli(
        [
            "attention",
            *[a for n, p in runs.items() for a in ("--backbone", f"{n}={p}")],
            "--untrained",
            "--tiles",
            *map(str, tiles),
            "--priors",
            *map(str, priors),
            "--out",
            str(out),
            "--overlays",
            str(tmp_path / "ov"),
            "--n-tiles",
            "6",
            "--n-overlays",
            "2",
            "--size",
            "64",
            "--batch-size",
            "4",
            "--cohort",
            "toy",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["n_images"] == 6 and doc["cohort"] == "toy" and doc["headline"] == "head_entropy"
    assert set(doc["runs"]) == {"untrained-s0", "untrained-s1", *runs}
    for res in doc["runs"].values():
        assert res["n_tokens"] == 16 and res["n_heads"] == 3 and len(res["per_image"]["head_entropy"]) == 6
        assert 0 <= res["head_entropy"]["mean"] <= 1
        for k in ("entropy", "gini", "top50_share", "top90_share"):
            assert 0 <= res["head_averaged_map"][k]["mean"] <= 1 and len(res["per_head"][k]) == 3
        cs = res["class_share"]
        assert cs["classes"][:2] == ["glass", "tissue"] and sum(cs["attention"]) == pytest.approx(1)
        assert sum(cs["area"]) == pytest.approx(1)
    # the mean of per-head entropies is at most the head-averaged map's entropy (concavity)
    r = doc["runs"]["dino-s0"]
    assert r["head_entropy"]["mean"] <= r["head_averaged_map"]["entropy"]["mean"] + 1e-9
    cmp = doc["comparisons"]["dirl-s1_vs_dino-s1"]
    assert set(cmp["head_entropy"]) >= {"mean_diff", "wilcoxon_p"} and len(cmp["enrichment_diff"]) == 4
    rep = doc["replicates"]["dirl_minus_dino"]
    assert set(rep["per_seed"]) == {"0", "1"} and rep["n_seeds"] == 2
    assert rep["per_seed"]["0"] == pytest.approx(doc["comparisons"]["dirl-s0_vs_dino-s0"]["head_entropy"]["mean_diff"])
    assert set(doc["replicates"]) == {"dino_minus_untrained", "dirl_minus_untrained", "dirl_minus_dino"}
    assert (tmp_path / "ov" / "overview.png").exists()
    assert len(list((tmp_path / "ov").glob("toy*_*.png"))) == 2


def test_untrained_reference_is_the_trainers_first_backbone():
    from dirl.analysis.attention import untrained_like
    from dirl.ssl.settings import PretrainSettings
    from dirl.ssl.trainer import Trainer

    s = PretrainSettings(**{**TINY_SETTINGS, "img_size": 32}, method="dino", seed=7)
    first = Trainer(s, None, torch.device("cpu")).teacher.backbone.state_dict()
    ref, _ = untrained_like({"arch": s.arch, "img_size": s.img_size, "settings": s.to_dict()})
    assert all(torch.equal(first[k], v) for k, v in ref.state_dict().items())
