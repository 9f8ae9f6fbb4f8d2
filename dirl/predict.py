"""`dirl predict`: a trained MIL model's prediction for one slide or a list, from the command line.

    dirl predict --model results/tcga/mil/dirl/abmil a.svs b.svs --out preds/ [--use folds]

Each slide is tiled as the model's cohort tiled its slides (the µm/px and tile size its model.json records,
the other tiling settings the defaults or `--settings`), its tiles are encoded by the encoder the model was
trained on (model.json's encoder spec), and the model (final, or the mean of the folds) is applied:
`<out>/predictions.csv` (slide, probabilities, prediction) and `<out>/attention.npz`; the tiles and features
stay under `<out>/tiles/` and `<out>/features/` for a second look (QuPath export, heatmaps).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dirl.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dirl.tiling import TileSettings

    p.add_argument("slides", nargs="+", help="whole-slide images")
    p.add_argument("--model", required=True, help="a trained MIL model directory (mil/{source}/{model})")
    p.add_argument("--use", choices=("final", "folds"), default="final", help="final model, or the folds' mean")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--slide-mpp", type=float, help="µm/px of slides whose metadata lacks it")
    p.add_argument("--threads", type=int, default=2)
    TileSettings.add_arguments(p.add_argument_group("tiling settings (µm/px and tile size come from the model)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    out = Path(args.out)
    return [out / "predictions.csv", out / "attention.npz"], [*args.slides, args.model]


def main(args: argparse.Namespace) -> None:
    from dirl import store
    from dirl.encoders import load_spec
    from dirl.extract import extract_slide, prepare_model
    from dirl.mil.deploy import apply, load_models
    from dirl.mil.final import read_model_json
    from dirl.mil.metrics import write_predictions
    from dirl.runtime import resolve_device, torch_threads
    from dirl.slide import Slide
    from dirl.tiling import TileSettings, tile_slide

    model_dir = Path(args.model)
    meta = read_model_json(model_dir)
    if args.use == "final" and not meta.get("final"):
        raise ConfigError(f"--use final: {model_dir} has no final model (mil.final: true): use --use folds")
    if not meta.get("encoder_spec"):
        raise ConfigError(f"{model_dir}/model.json records no encoder spec: rerun `dirl mil` on its cohort")
    geo = meta["tiles"]
    s = TileSettings.from_args(args).replace(mpp=float(geo["mpp"]), tile_px=int(geo["tile_px"]))
    out = Path(args.out)
    ids = [Path(p).stem for p in args.slides]
    if len(set(ids)) != len(ids):
        raise ConfigError("two slides share a file name: give each its own name (its id in the outputs)")
    device = resolve_device("auto")
    classes = meta["classes"]
    with torch_threads(args.threads):
        encoder = load_spec(meta["encoder_spec"])
        if meta.get("encoder") and encoder.encoder_id != meta["encoder"]:
            raise ConfigError(
                f"the encoder at {meta['encoder_spec']} is {encoder.encoder_id}, the model's {meta['encoder']}"
            )
        amp, channels_last = prepare_model(encoder, device)
        models = load_models(model_dir, args.use)
        rows, attention = [], {}
        for path, sid in zip(args.slides, ids):
            tiles, feats = out / "tiles" / f"{sid}.zarr", out / "features" / f"{sid}.h5"
            with Slide.open(path, sid, args.slide_mpp) as slide:
                tile_slide(slide, tiles, s, threads=args.threads)
            extract_slide(tiles, feats, encoder, device, amp_dtype=amp, channels_last=channels_last)
            x = store.read_features(feats)[0]
            if not len(x):
                log.warning("slide %s: no tissue tiles, no prediction", sid)
                continue
            p, a = apply(models, x)
            if a is not None:
                attention[sid] = a
            rows.append(
                {
                    "slide_id": sid,
                    "patient_id": sid,
                    "label": "",
                    "pred": classes[int(p.argmax())],
                    **{f"prob_{c}": float(v) for c, v in zip(classes, p)},
                }
            )
            log.info("slide %s: %s (%s)", sid, rows[-1]["pred"], ", ".join(f"{c} {v:.3f}" for c, v in zip(classes, p)))
    write_predictions(out / "predictions.csv", rows, classes)
    store.write_tile_scores(out / "attention.npz", attention)
