"""Attention sparsity metrics on constructed maps, the attention hook, and `dirl attention` end to end."""
import json
import math

import pytest
import torch

from dirl.analysis.attention import (attention_metrics, attention_over_patches, class_share,
                                     last_layer_attention, sample_tiles)
from dirl.cli import main as cli
from dirl.ssl.data import write_toy_cohort


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


def _fake_backbone(path, seed, method):
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, dynamic_img_size=True)
    path.mkdir(parents=True)
    torch.save(m.state_dict(), path / "backbone.pt")
    (path / "backbone.json").write_text(json.dumps({
        "arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 16, "embed": "cls", "method": method,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    return path / "backbone.pt"


def test_cli_compares_backbones(tmp_path):
    tiles, priors = write_toy_cohort(tmp_path / "c", n_slides=2, n_tiles=5, tile_px=64)
    dino = _fake_backbone(tmp_path / "pretrain" / "dino", 0, "dino")
    dirl = _fake_backbone(tmp_path / "pretrain" / "dirl", 1, "dirl")
    out = tmp_path / "analysis" / "attention_{method}.json"
    rc = cli(["attention", "--backbone", str(dino), "--backbone", f"dirl={dirl}", "--tiles", *map(str, tiles),
              "--priors", *map(str, priors), "--out", str(out), "--overlays", str(tmp_path / "ov"),
              "--n-tiles", "6", "--n-overlays", "2", "--size", "64", "--batch-size", "4", "--cohort", "toy"])
    assert rc == 0
    for method in ("dino", "dirl"):
        doc = json.loads((tmp_path / "analysis" / f"attention_{method}.json").read_text())
        res = doc["methods"][method]
        assert doc["n_images"] == 6 and doc["cohort"] == "toy" and res["n_tokens"] == 16
        for k in ("entropy", "gini", "top50_share", "top90_share"):
            assert 0 <= res["summary"][k]["mean"] <= 1 and len(res["per_head"][k]) == 3
            assert len(res["per_image"][k]) == 6
        cs = res["class_share"]
        assert cs["classes"][:2] == ["background", "tissue"] and sum(cs["attention"]) == pytest.approx(1)
        assert sum(cs["area"]) == pytest.approx(1)
        assert set(doc["comparison"]["dirl_vs_dino"]["entropy"]) >= {"mean_diff", "wilcoxon_p"}
    assert (tmp_path / "ov" / "overview.png").exists()
    assert len(list((tmp_path / "ov").glob("toy*_*.png"))) == 2
