"""Benchmark of deployment (`dirl deploy`): what applying a trained MIL model adds to extraction, per
slide, same run. Prints JSON.

    python bench/deploy.py [--small] [--slides 4] [--tiles 2048] [--model abmil] [--out FILE]

- extract: `dirl extract`'s pipeline on each slide's tile store (synthetic H&E, as bench/extract.py)
- deploy:  dirl.mil.deploy.deploy on those features with a final model: reading the HDF5 files, the
           model, predictions.csv, attention.npz, metrics with the patient bootstrap, ROC figure
Reported: seconds per slide of each and deploy / extract (the share deployment adds to what a new
cohort costs anyway; the goal is a few per cent).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from emit import emit
from extract import make_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def final_model(directory: Path, name: str, dim: int, classes: list[str]) -> None:
    """A final MIL model of `dirl mil --final`'s layout, random weights (the cost does not depend on them)."""
    import torch

    from dirl.mil import final
    from dirl.mil.models import Standardized, build
    from dirl.mil.train import MilSettings, model_options

    cfg = MilSettings(final=True)
    core = build(name, dim, len(classes), **model_options(cfg))
    model = Standardized(core, torch.zeros(dim), torch.ones(dim))
    ck = {"model": name, "state_dict": model.state_dict(), "options": model_options(cfg), "in_dim": dim}
    (directory / final.FINAL).mkdir(parents=True, exist_ok=True)
    torch.save({**ck, "classes": classes, "fold": final.FINAL}, directory / final.FINAL / "model.pt")
    final.write_model_json(
        directory,
        model_name=name,
        source="bench",
        classes=classes,
        cfg=cfg,
        encoder=None,
        spec=None,
        geometry={"mpp": 0.5, "tile_px": 224},
        folds=[],
        final_epochs=1,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--tiles", type=int, default=2048, help="tiles per slide")
    ap.add_argument("--model", default="abmil", choices=["abmil", "transmil", "meanpool"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--small", action="store_true", help="ViT-Tiny, 2 slides of 256 tiles: a quick CPU check")
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.small:
        a.arch, a.slides, a.tiles = "vit_tiny_patch16_224", 2, 256

    import torch

    from dirl.encoders import load_timm
    from dirl.extract import default_workers, extract_slide, prepare_model
    from dirl.mil.deploy import deploy
    from dirl.runtime import resolve_device

    device = resolve_device(a.device)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dirl-bench-deploy-"))
    enc = load_timm(a.arch, "random", embed_kind="cls", img_size=a.img)
    amp, cl = prepare_model(enc, device, "auto")
    workers = default_workers(device)
    sheet = ["slide_id\tpath\tpatient_id\tlabel"]
    t_extract = 0.0
    for i in range(a.slides):
        sid = f"s{i}"
        tiles = work / "tiles" / f"{sid}.zarr"
        if not tiles.exists():
            make_store(tiles, a.tiles, a.img, "zstd")
        t = time.perf_counter()
        extract_slide(
            tiles, work / "features" / f"{sid}.h5", enc, device, workers=workers, amp_dtype=amp, channels_last=cl
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_extract += time.perf_counter() - t
        sheet.append(f"{sid}\t{sid}.svs\tp{i}\t{'AB'[i % 2]}")
    (work / "samples.tsv").write_text("\n".join(sheet) + "\n")
    model_dir = work / "mil" / "bench" / a.model
    final_model(model_dir, a.model, enc.dim, ["A", "B"])
    t = time.perf_counter()
    result = deploy(model_dir, "final", work / "features", str(work / "samples.tsv"), work / "deploy", work / "tiles")
    t_deploy = time.perf_counter() - t
    assert result["n_slides"] == a.slides
    res = {
        "bench": "deploy",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "arch": a.arch,
        "model": a.model,
        "slides": a.slides,
        "tiles_per_slide": a.tiles,
        "extract_s_per_slide": round(t_extract / a.slides, 3),
        "deploy_s_per_slide": round(t_deploy / a.slides, 3),
        "deploy_vs_extract": round(t_deploy / t_extract, 4),
    }
    emit(res, a.out)


if __name__ == "__main__":
    main()
