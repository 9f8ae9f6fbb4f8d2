"""`dirl mil`: patient-level cross-validated MIL on one feature source (metrics and result files:
dirl.mil.metrics; models: dirl.mil.models; splits: dirl.mil.splits).

About 440 lines because the fold loop, the files it writes and its CLI read as one story; the metrics,
the models and the splits already live apart.

For each fold of `splits.json` (see splits.py): train one model on the training bags (one bag per step,
or a few bags per step with gradient accumulation — never padded), class-weighted cross-entropy, AdamW,
early stopping on the validation split's loss, keep the best epoch. Then predict the fold's test slides.

Outputs in `--out` (= `mil/{source}/{model}/`), with the cohort's `mil/splits.json` (`dirl splits`):
  fold{i}/model.pt       best checkpoint: state dict, model name/options, classes, epoch, val loss
  predictions.csv        out-of-fold: slide_id, patient_id, label, fold, pred, prob_<class>...
  metrics.json           per fold and mean ± sd (ddof 1): auc (macro one-vs-rest; binary: plain),
                         balanced_accuracy, f1_macro; plus pooled out-of-fold values
  roc.png                out-of-fold ROC curves
  attention.npz          out-of-fold tile attention of every slide (tile rows; `dirl export` shows it in QuPath)
  heatmaps/{slide}.png   tile attention painted on a thumbnail built from the tile store itself
                         (no slide file needed) for a few confidently, correctly classified slides
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import ConfigError
from dirl.mil.data import Bags, Cohort, open_bags, read_sample_sheet
from dirl.mil.metrics import compute_metrics, json_safe, mean_sd, plot_roc, write_predictions
from dirl.mil.splits import write_json
from dirl.settings import Settings, bounded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MilSettings(Settings):
    """The `mil` section's training settings (`folds`, `val_fraction` and `seed` also make the splits:
    dirl.mil.splits.SplitSettings)."""

    epochs: int = bounded(50, ge=1)
    patience: int = bounded(10, ge=1)  # epochs without a better validation loss before stopping
    min_epochs: int = bounded(5, ge=0)
    lr: float = bounded(2e-4, gt=0)
    weight_decay: float = bounded(1e-2, ge=0)
    bags_per_step: int = bounded(1, ge=1)  # bags per optimiser step (gradient accumulation, no padding)
    max_tiles: int = bounded(0, ge=0)  # random subset of larger training bags (0: whole bags)
    standardize: bool = True  # per-dimension z-score of the features (training tiles' statistics)
    hidden: int = bounded(256, ge=1)
    dropout: float = bounded(0.25, ge=0, lt=1)
    transmil_attention: str = field(
        default="exact",
        metadata={
            "choices": ("exact", "nystrom"),
            "help": "TransMIL attention: exact softmax (SDPA kernels) or the paper's Nystrom",
        },
    )
    seed: int = 0
    heatmaps: int = bounded(4, ge=0)  # attention heatmaps to draw (0: none)
    device: str = "auto"
    memory_gb: float = bounded(16.0, ge=0)  # hold bags in RAM up to this size
    device_cache_gb: float = bounded(4.0, ge=0)  # hold bags on the device up to this
    final: bool = False  # also train on every labelled slide, for the epochs the folds chose (mil/.../final/)


# --------------------------------------------------------------------------------------------------
# training
class _DeviceBags:
    """Bags as float32 tensors, cached on the device when they fit in `cache_gb`."""

    def __init__(self, bags: Bags, ids: list[str], device, cache_gb: float):
        import torch

        self.bags, self.device = bags, device
        need = sum(bags.n_tiles[s] for s in ids) * bags.dim * 4 / 2**30
        self.cache: dict[str, Any] = {}
        if need <= cache_gb:
            for s in ids:
                self.cache[s] = torch.from_numpy(bags.features(s)).to(device)

    def __call__(self, s: str):
        import torch

        x = self.cache.get(s)
        if x is None:
            t = torch.from_numpy(self.bags.features(s))
            if self.device.type == "cuda":
                t = t.pin_memory()
            x = t.to(self.device, non_blocking=True)
        return x


def model_options(cfg: MilSettings) -> dict[str, Any]:
    return {"hidden": cfg.hidden, "dropout": cfg.dropout, "attention": cfg.transmil_attention}


def _feature_stats(bags: Bags, ids: list[str]):
    import torch

    s = s2 = None
    n = 0
    for sid in ids:
        x = bags.features(sid).astype(np.float64)
        s = x.sum(0) if s is None else s + x.sum(0)
        s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
        n += len(x)
    mean = s / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    return torch.from_numpy(mean), torch.from_numpy(np.sqrt(var))


def class_weights(y: np.ndarray, k: int) -> np.ndarray:
    """Balanced class weights n / (k * count): 1 on a balanced training set, a rare class weighs more."""
    counts = np.bincount(y, minlength=k).astype(float)
    return np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)


class WeightedBagLoss:
    """Cross-entropy of one bag times its class weight. (torch's CrossEntropyLoss(weight=w) divides by
    the weights of the batch's targets: with one bag per call the weights cancel.) `mean` is the weighted
    mean over bags, sum(w_i CE_i) / sum(w_i): the class-balanced validation loss for early stopping."""

    def __init__(self, weights: np.ndarray, device):
        import torch

        self.w = torch.as_tensor(weights, dtype=torch.float32, device=device)

    def __call__(self, logits, target: int):
        import torch.nn.functional as F

        return self.w[target] * F.cross_entropy(logits.float()[None], self.w.new_tensor([target]).long())

    def mean(self, losses: list[float], targets: list[int]) -> float:
        w = self.w.cpu().numpy()[targets]
        return float(np.dot(w, losses) / w.sum()) if len(losses) and w.sum() > 0 else float("nan")


def _evaluate(model, get, ids: list[str], y: dict[str, int], loss_fn: WeightedBagLoss | None, want_attention=False):
    """Probabilities, the (class-weighted) mean loss and attention of the bags `ids`."""
    import torch

    model.eval()
    probs, losses, attn = [], [], {}
    with torch.inference_mode():
        for s in ids:
            logits, a = model(get(s))
            probs.append(torch.softmax(logits.float(), -1).cpu().numpy())
            if loss_fn is not None:
                losses.append(float(loss_fn(logits, y[s])) / float(loss_fn.w[y[s]]))  # plain CE per bag
            if want_attention and a is not None:
                attn[s] = a.float().cpu().numpy()
    loss = loss_fn.mean(losses, [y[s] for s in ids]) if loss_fn is not None else float("nan")
    return np.array(probs), loss, attn


def train_fold(
    model_name: str,
    bags: Bags,
    train_ids: list[str],
    val_ids: list[str],
    y: dict[str, int],
    n_classes: int,
    cfg: MilSettings,
    device,
    fold: int = 0,
    cache_gb: float = 4.0,
    get=None,
) -> tuple[Any, dict[str, Any]]:
    """Train one model; returns (best model, info). `get(slide) -> tensor` can be shared across folds."""
    import torch

    from dirl.mil.models import Standardized, build

    torch.manual_seed(cfg.seed * 1000 + fold)
    rng = np.random.default_rng(cfg.seed * 1000 + fold)
    get = get or _DeviceBags(bags, train_ids + val_ids, device, cache_gb)
    core = build(model_name, bags.dim, n_classes, **model_options(cfg))
    if cfg.standardize:
        mean, std = _feature_stats(bags, train_ids)
    else:
        mean, std = torch.zeros(bags.dim), torch.ones(bags.dim)
    model = Standardized(core, mean, std).to(device)
    ytr = np.array([y[s] for s in train_ids])
    loss_fn = WeightedBagLoss(class_weights(ytr, n_classes), device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = {"loss": float("inf"), "epoch": -1, "state": None}
    history = []
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(train_ids))
        opt.zero_grad(set_to_none=True)
        total, in_step = 0.0, 0
        for j, i in enumerate(order):
            s = train_ids[i]
            x = get(s)
            if cfg.max_tiles and x.shape[0] > cfg.max_tiles:
                keep = torch.from_numpy(rng.choice(x.shape[0], cfg.max_tiles, replace=False)).to(x.device)
                x = x[keep]
            logits, _ = model(x)
            loss = loss_fn(logits, y[s])
            (loss / cfg.bags_per_step).backward()
            total += float(loss.detach())
            in_step += 1
            if in_step == cfg.bags_per_step or j == len(order) - 1:
                opt.step()
                opt.zero_grad(set_to_none=True)
                in_step = 0
                steps += 1
        train_loss = total / max(1, len(order))
        if val_ids:
            _, val_loss, _ = _evaluate(model, get, val_ids, y, loss_fn)
        else:
            val_loss = float("nan")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        improved = (not val_ids) or val_loss < best["loss"] - 1e-6
        if improved:
            best = {"loss": val_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch + 1 >= cfg.min_epochs and epoch - best["epoch"] >= cfg.patience:
            break
    model.load_state_dict(best["state"])
    info = {
        "best_epoch": best["epoch"],
        "val_loss": best["loss"],
        "epochs_run": len(history),
        "seconds": time.perf_counter() - t0,
        "steps": steps,
        "history": history,
    }
    return model, info


# --------------------------------------------------------------------------------------------------
def run_cv(
    cohort: Cohort,
    bags: Bags,
    splits: dict[str, Any],
    model_name: str,
    out: Path,
    cfg: MilSettings,
    device,
    *,
    excluded: list[str] = (),
    source: str = "",
    tiles_dir: Path | None = None,
    n_heatmaps: int = 4,
    cache_gb: float = 4.0,
    encoder_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import torch

    from dirl.mil import final
    from dirl.mil.models import MODELS

    if model_name not in MODELS:
        raise ConfigError(f"unknown MIL model {model_name!r}: choose one of {sorted(MODELS)}")
    out.mkdir(parents=True, exist_ok=True)
    classes = cohort.classes
    y = dict(zip(cohort.slide_ids, cohort.y.tolist()))
    patient = dict(zip(cohort.slide_ids, cohort.patient_ids))
    drop = set(excluded)
    usable = [s for s in cohort.slide_ids if s not in drop]
    get = _DeviceBags(bags, usable, device, cache_gb)
    rows, fold_metrics, attention = [], [], {}
    for i, f in enumerate(splits["splits"]):
        tr, va, te = ([s for s in f[k] if s not in drop] for k in ("train", "val", "test"))
        if not tr or not te:
            raise ConfigError(
                f"fold {i} has no usable training or test slides after leaving out {len(drop)} slide(s) without tiles"
            )
        model, info = train_fold(model_name, bags, tr, va, y, len(classes), cfg, device, fold=i, get=get)
        ckpt = {
            "model": model_name,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "options": model_options(cfg),
            "in_dim": bags.dim,
            "classes": classes,
            "fold": i,
            "encoder": bags.encoder,
            **{k: info[k] for k in ("best_epoch", "val_loss", "epochs_run")},
        }
        with store.atomic_path(out / f"fold{i}" / "model.pt") as tmp:
            torch.save(ckpt, tmp)
        prob, _, att = _evaluate(model, get, te, y, None, want_attention=True)
        attention.update(att)
        yt = np.array([y[s] for s in te])
        m = compute_metrics(yt, prob)
        fold_metrics.append(
            {
                "fold": i,
                "n_train": len(tr),
                "n_val": len(va),
                "n_test": len(te),
                **m,
                **{k: info[k] for k in ("best_epoch", "val_loss", "epochs_run", "seconds", "steps")},
            }
        )
        log.info(
            "fold %d: auc %.3f  bacc %.3f  f1 %.3f  (best epoch %d of %d, %.1f s)",
            i,
            m["auc"],
            m["balanced_accuracy"],
            m["f1_macro"],
            info["best_epoch"],
            info["epochs_run"],
            info["seconds"],
        )
        for s, p in zip(te, prob):
            rows.append(
                {
                    "slide_id": s,
                    "patient_id": patient[s],
                    "label": classes[y[s]],
                    "fold": i,
                    "pred": classes[int(p.argmax())],
                    **{f"prob_{c}": float(v) for c, v in zip(classes, p)},
                }
            )
    write_predictions(out / "predictions.csv", rows, classes)
    store.write_tile_scores(out / "attention.npz", attention)  # out of fold, every slide (none for meanpool)
    yy = np.array([classes.index(r["label"]) for r in rows])
    pp = np.array([[r[f"prob_{c}"] for c in classes] for r in rows])
    keys = ("auc", "balanced_accuracy", "f1_macro")
    mean, sd = mean_sd(fold_metrics, keys)
    metrics = {
        "feature_source": source,
        "model": model_name,
        "encoder": bags.encoder,
        "classes": classes,
        "n_slides": len(rows),
        "n_patients": len({r["patient_id"] for r in rows}),
        "excluded_slides": sorted(drop),
        "folds": fold_metrics,
        "mean": mean,
        "sd": sd,
        "pooled": compute_metrics(yy, pp),
        "config": asdict(cfg),
        "splits": {k: splits[k] for k in ("folds", "val_fraction", "seed")},
    }
    plot_roc(out / "roc.png", rows, classes, title=f"{source or 'features'} / {model_name}")
    if n_heatmaps and model_name != "meanpool":
        from dirl.mil.heatmap import pick_slides, render

        for s in pick_slides(rows, classes, n_heatmaps):
            if s not in attention:
                continue
            tiles = tiles_dir / f"{s}.zarr" if tiles_dir else None
            if tiles is not None and not tiles.exists():
                log.warning("no tile store %s: heatmap of %s drawn without the thumbnail", tiles, s)
                tiles = None
            render(
                out / "heatmaps" / f"{s}.png",
                bags.coords(s),
                attention[s],
                tiles=tiles,
                tile_px_level0=_tile_size_level0(bags, s),
                title=f"{s}: {rows[[r['slide_id'] for r in rows].index(s)]['label']} ({model_name})",
            )
    elif n_heatmaps:
        log.info("meanpool attention is uniform: no heatmaps")
    final_epochs = final.chosen_epochs(fold_metrics) if cfg.final else None
    if final_epochs:
        final.train_final(model_name, bags, usable, y, classes, cfg, device, final_epochs, out, get)
    final.write_model_json(
        out,
        model_name=model_name,
        source=source,
        classes=classes,
        cfg=cfg,
        encoder=bags.encoder,
        spec=encoder_spec,
        geometry=final.tile_geometry(bags, usable),
        folds=fold_metrics,
        final_epochs=final_epochs,
    )
    write_json(out / "metrics.json", json_safe(metrics))
    log.info(
        "%s/%s: AUC %.3f ± %.3f, balanced accuracy %.3f ± %.3f, F1 %.3f ± %.3f over %d folds",
        source,
        model_name,
        mean["auc"],
        sd["auc"],
        mean["balanced_accuracy"],
        sd["balanced_accuracy"],
        mean["f1_macro"],
        sd["f1_macro"],
        len(fold_metrics),
    )
    return metrics


def _tile_size_level0(bags: Bags, s: str) -> int:
    attrs = store.read_features(bags.paths[s])[2]
    return int(attrs.get("patch_size_level0") or attrs.get("patch_size") or 256)


# --------------------------------------------------------------------------------------------------
# CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="sample sheet TSV (slide_id, label, [patient_id])")
    p.add_argument("--features", required=True, help="feature directory (features/{source})")
    p.add_argument(
        "--splits", required=True, help="the cohort's splits (`dirl splits`), shared by every feature source and model"
    )
    p.add_argument("--model", default="abmil", help="MIL model: abmil, transmil, meanpool")
    p.add_argument("--out", required=True, help="output directory (mil/{source}/{model})")
    p.add_argument("--source", help="feature source name for tables (default: the feature directory name)")
    p.add_argument("--tiles", help="tile store directory (tiles/) for heatmap thumbnails")
    p.add_argument(
        "--encoder-spec",
        help="JSON: how `dirl extract` built the features' encoder (recorded in model.json for deployment)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default; 1 is fastest for small bags on a busy machine)",
    )
    MilSettings.add_arguments(p.add_argument_group("settings (MilSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    names = ["metrics.json", "predictions.csv", "attention.npz", "roc.png", "model.json"]
    return [Path(args.out) / n for n in names], [
        args.samples,
        args.features,
        args.splits,
    ]


def main(args: argparse.Namespace) -> None:
    from dirl.runtime import torch_threads

    with torch_threads(args.threads):
        _main(args)


def _main(args: argparse.Namespace) -> None:
    from dirl.mil.splits import load_splits
    from dirl.runtime import resolve_device

    s = MilSettings.from_args(args)
    cohort = read_sample_sheet(args.samples)
    splits = load_splits(args.splits, cohort)
    out = Path(args.out)
    bags, empty = open_bags(args.features, cohort.slide_ids)
    bags.preload([x for x in cohort.slide_ids if x not in set(empty)], s.memory_gb)
    source = args.source or Path(args.features.rstrip("/")).name
    run_cv(
        cohort,
        bags,
        splits,
        args.model,
        out,
        s,
        resolve_device(s.device),
        excluded=empty,
        source=source,
        tiles_dir=Path(args.tiles) if args.tiles else None,
        n_heatmaps=s.heatmaps,
        cache_gb=s.device_cache_gb,
        encoder_spec=json.loads(args.encoder_spec) if args.encoder_spec else None,
    )
