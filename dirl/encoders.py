"""Tile encoders for `dirl extract`: a pretrained DiRL/DINO backbone, or any timm model with local weights.

Two sources, one result (`Encoder`):

* a pretrain output directory (or its `backbone.pt`) with `backbone.json` beside it:
  ``{"arch", "img_size", "embed": "cls"|"mean", "mean", "std", "method"}``; the state dict loads
  strictly into ``timm.create_model(arch, num_classes=0, img_size=..., dynamic_img_size=True)``;
* ``timm:NAME`` plus a local weights file (``.pth``/``.bin``/``.safetensors``; checkpoints that nest the
  state dict under ``state_dict``/``model`` are unwrapped), or ``local-dir:/path`` (a Hugging Face-style
  timm folder with ``config.json``). Normalisation and input size come from the model's pretrained
  config, so a user can compare with an ImageNet or a public pathology encoder they have on disk.

Two more, the probe's references (feature sources beside the runs, `dirl.runs`):

* ``untrained:PATH`` — the backbone of a pretrain run (PATH as above) as the trainer built it before its
  first step: same architecture, same seeded initialisation, no training (the attention diagnostics'
  reference);
* ``colour`` — no network: colour statistics of each tile (per RGB and optical-density channel: mean, sd
  and the 10th, 50th and 90th percentiles; 30 numbers), the baseline an encoder has to beat.

Embeddings: ``cls`` = the pre-logits [CLS] token, ``mean`` = mean of the patch tokens (prefix tokens —
[CLS] and registers — excluded), ``pooled`` = the model's own head pooling (``forward_head(pre_logits=
True)``; the only choice for CNNs).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirl.errors import ConfigError

log = logging.getLogger(__name__)
EMBEDS = ("cls", "mean", "pooled")


@dataclass
class Encoder:
    model: Any  # torch.nn.Module, eval mode
    img_size: int  # square input side the model is fed
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed: str  # cls | mean | pooled
    encoder_id: str  # written to the `encoder` attr of every feature file
    dim: int  # embedding size D
    meta: dict[str, Any] = field(default_factory=dict)  # backbone.json of a pretrained backbone

    def embed_batch(self, x):
        """Embeddings (B, D) of a normalised float batch (B, 3, img_size, img_size)."""
        return embed(self.model, x, self.embed)


def embed(model, x, kind: str):
    feats = model.forward_features(x)
    if kind == "pooled":
        return model.forward_head(feats, pre_logits=True)
    if kind == "cls":
        if feats.ndim != 3 or getattr(model, "num_prefix_tokens", 0) < 1:
            raise ConfigError(
                f"embedding 'cls' needs a ViT with a [CLS] token; {type(model).__name__} "
                "has none: use 'mean' or 'pooled'"
            )
        return (
            model.forward_head(feats, pre_logits=True) if getattr(model, "global_pool", "") == "token" else feats[:, 0]
        )
    if kind == "mean":
        if feats.ndim == 3:  # ViT tokens (B, prefix + patches, D)
            return feats[:, getattr(model, "num_prefix_tokens", 0) :].mean(dim=1)
        if feats.ndim == 4:  # CNN map (B, C, H, W)
            return feats.mean(dim=(2, 3))
    raise ConfigError(f"unknown embedding {kind!r}: choose one of {EMBEDS}")


def file_digest(path: str | Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n]


def _finish(model, *, img_size: int, mean, std, embed_kind: str, encoder_id: str) -> Encoder:
    import torch

    if embed_kind not in EMBEDS:
        raise ConfigError(f"unknown embedding {embed_kind!r}: choose one of {EMBEDS}")
    model.eval()
    with torch.inference_mode():
        dim = int(embed(model, torch.zeros(1, 3, img_size, img_size), embed_kind).shape[-1])
    return Encoder(
        model, int(img_size), tuple(float(v) for v in mean), tuple(float(v) for v in std), embed_kind, encoder_id, dim
    )


def load_backbone(path: str | Path, *, embed_kind: str | None = None) -> Encoder:
    """Load `pretrain/{method}/backbone.pt` (or the directory holding it) with its `backbone.json`."""
    import timm
    import torch

    pt, meta = _backbone_meta(path)
    if not pt.exists():
        raise ConfigError(f"{pt} does not exist: run `dirl pretrain` first (it writes backbone.pt and backbone.json)")
    meta_path = pt.with_suffix(".json")
    img = int(meta["img_size"])
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=0, img_size=img, dynamic_img_size=True)
    state = torch.load(pt, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{pt} does not match architecture {meta['arch']!r} of {meta_path}: {e}") from e
    kind = embed_kind or meta["embed"]
    method = meta.get("method", pt.parent.name)
    eid = f"{method}:{meta['arch']} embed={kind} img={img} weights=sha256:{file_digest(pt)}"
    enc = _finish(model, img_size=img, mean=meta["mean"], std=meta["std"], embed_kind=kind, encoder_id=eid)
    enc.meta = meta
    return enc


def _backbone_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    pt = path / "backbone.pt" if path.is_dir() else path.with_suffix(".pt")
    meta_path = pt.with_suffix(".json")
    if not meta_path.exists():
        raise ConfigError(f"{meta_path} does not exist: run `dirl pretrain` first (it writes backbone.json)")
    meta = json.loads(meta_path.read_text())
    missing = [k for k in ("arch", "img_size", "embed", "mean", "std") if k not in meta]
    if missing:
        raise ConfigError(f"{meta_path} lacks {missing}; rerun `dirl pretrain`")
    return pt, meta


def untrained_backbone(meta: dict[str, Any]):
    """The backbone as the trainer built it before its first step: same architecture and the same
    seeded initialisation (Trainer seeds torch with `seed`, then builds the student's backbone)."""
    import torch

    from dirl.ssl.model import create_backbone

    settings = meta.get("settings", {})
    torch.manual_seed(int(settings.get("seed", 0)))
    return create_backbone(meta["arch"], int(meta["img_size"]), float(settings.get("drop_path", 0.0)))


def load_untrained(path: str | Path, *, embed_kind: str | None = None) -> Encoder:
    """`untrained:PATH`: the untrained reference of the pretrain run at PATH (its backbone.json)."""
    from dirl.runs import UNTRAINED

    _, meta = _backbone_meta(path)
    model = untrained_backbone(meta)
    kind = embed_kind or meta["embed"]
    seed = int(meta.get("settings", {}).get("seed", 0))
    eid = f"{UNTRAINED}:{meta['arch']} embed={kind} img={meta['img_size']} seed={seed}"
    enc = _finish(
        model, img_size=int(meta["img_size"]), mean=meta["mean"], std=meta["std"], embed_kind=kind, encoder_id=eid
    )
    enc.meta = {**meta, "method": UNTRAINED}
    return enc


COLOUR_PERCENTILES = (0.1, 0.5, 0.9)
# the 30 colour statistics, in the order `colour` writes them (statistic-major)
COLOUR_FEATURES = tuple(
    f"{c}_{stat}" for stat in ("mean", "sd", "p10", "p50", "p90") for c in ("R", "G", "B", "OD_R", "OD_G", "OD_B")
)


def colour_encoder(img_size: int = 224) -> Encoder:
    import torch

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the model sees RGB in 0..1

    class Colour(torch.nn.Module):
        def forward_features(self, x):
            rgb = x.clamp(0, 1).flatten(2)  # (B, 3, N)
            od = -torch.log10((rgb * 255.0 + 1.0) / 256.0)
            ch = torch.cat([rgb, od], 1)  # (B, 6, N)
            q = torch.quantile(ch, torch.tensor(COLOUR_PERCENTILES, dtype=ch.dtype), dim=2)  # (3, B, 6)
            return torch.cat([ch.mean(2), ch.std(2), *q], 1)  # (B, 30): stat-major

        def forward_head(self, feats, pre_logits=True):
            return feats

    eid = f"colour: RGB + OD x (mean, sd, p10, p50, p90) img={img_size}"
    return _finish(Colour(), img_size=img_size, mean=mean, std=std, embed_kind="pooled", encoder_id=eid)


def _read_state_dict(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher", "backbone"):  # common checkpoint nestings
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ConfigError(f"{path} holds no state dict")
    for prefix in ("module.", "backbone.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_timm(
    name: str,
    weights: str | Path | None,
    *,
    embed_kind: str = "pooled",
    img_size: int | None = None,
    model_kwargs: dict | None = None,
    mean=None,
    std=None,
) -> Encoder:
    """A timm model by name with weights from a local file, or `local-dir:/path` (config.json + weights).

    `weights=None` is refused for a plain name (random weights are no encoder); pass `weights="random"`
    to ask for them on purpose (benchmarks, tests)."""
    import timm

    kwargs = dict(model_kwargs or {})
    if img_size:
        kwargs["img_size"] = int(img_size)
    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1])
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a directory (local-dir: wants a timm/HF model folder)")
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        digest = "local-dir"
        weight_files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if weight_files:
            digest = f"sha256:{file_digest(weight_files[0])}"
    elif weights in (None, ""):
        raise ConfigError(
            f"timm model {name!r} needs a local weights file (--weights PATH); this pipeline never downloads weights"
        )
    elif str(weights) == "random":
        log.warning("timm model %s with RANDOM weights (benchmark/test use only)", name)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        digest = "random"
    else:
        wpath = Path(weights)
        if not wpath.exists():
            raise ConfigError(f"weights file {wpath} does not exist")
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        sd = _read_state_dict(wpath)
        filt = getattr(
            __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"]), "checkpoint_filter_fn", None
        )
        if filt is not None:  # timm's own converter: resizes position embeddings, renames old keys
            try:
                sd = filt(sd, model)
            except Exception as e:  # noqa: BLE001 - fall back to the raw dict, the strict check below decides
                log.debug("checkpoint_filter_fn failed (%s); loading the raw state dict", e)
        head = {k for k in sd if k.startswith(("head.", "fc.", "classifier.", "head_dist."))}
        try:
            missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if k not in head}, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when not strict
            raise ConfigError(
                f"{wpath} does not fit timm model {name!r} (wrong name or "
                f"--model-kwargs?): {str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}"
            ) from e
        if missing or unexpected:
            raise ConfigError(
                f"{wpath} does not fit timm model {name!r}: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}; check the name and --model-kwargs"
            )
        digest = f"sha256:{file_digest(wpath)}"
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(img_size or _native_size(model) or cfg["input_size"][-1])
    eid = f"timm:{name} embed={embed_kind} img={size} weights={digest}"
    return _finish(
        model, img_size=size, mean=mean or cfg["mean"], std=std or cfg["std"], embed_kind=embed_kind, encoder_id=eid
    )


def _native_size(model) -> int | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if isinstance(size, (tuple, list)):
        return int(size[0])
    return int(size) if size else None


SPEC_KEYS = ("encoder", "weights", "embed", "img_size", "model_kwargs")  # an encoder, as the workflow names it


def spec_args(spec: dict[str, Any]) -> list[str]:
    """`dirl extract` arguments of an encoder spec ({encoder, weights, embed, img_size, model_kwargs})."""
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"encoder spec {spec}: unknown key(s) {unknown}; known: {', '.join(SPEC_KEYS)}")
    args = ["--encoder", str(spec["encoder"])]
    for key in ("weights", "embed", "img_size"):
        if spec.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(spec[key])]
    if spec.get("model_kwargs"):
        args += ["--model-kwargs", json.dumps(spec["model_kwargs"])]
    return args


def load_spec(spec: dict[str, Any]) -> Encoder:
    """The encoder of a spec (what a final MIL model records it was trained on)."""
    return load_encoder(
        str(spec["encoder"]),
        weights=spec.get("weights"),
        embed_kind=spec.get("embed"),
        img_size=spec.get("img_size"),
        model_kwargs=spec.get("model_kwargs") or None,
    )


def load_encoder(
    spec: str,
    *,
    weights: str | None = None,
    embed_kind: str | None = None,
    img_size: int | None = None,
    model_kwargs: dict | None = None,
) -> Encoder:
    """`spec`: a pretrain directory / backbone.pt, `timm:NAME` (with `weights`), `local-dir:/path`,
    `untrained:<pretrain directory or backbone.pt>` or `colour`."""
    if spec == "colour":
        return colour_encoder(img_size or 224)
    if spec.startswith("untrained:"):
        return load_untrained(spec.split(":", 1)[1], embed_kind=embed_kind)
    if spec.startswith("timm:"):
        return load_timm(
            spec[5:], weights, embed_kind=embed_kind or "pooled", img_size=img_size, model_kwargs=model_kwargs
        )
    if spec.startswith("local-dir:"):
        return load_timm(spec, None, embed_kind=embed_kind or "pooled", img_size=img_size, model_kwargs=model_kwargs)
    if img_size or model_kwargs or weights:
        raise ConfigError(
            "--img-size/--model-kwargs/--weights apply to timm: encoders; a pretrain "
            "backbone takes them from backbone.json"
        )
    return load_backbone(spec, embed_kind=embed_kind)
