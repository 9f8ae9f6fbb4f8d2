"""The attention overlays of `dirl attention`: per tile the image, its prior map and each backbone's
head-averaged attention on one colour scale (so that sparsity shows), and an overview of all tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F

from dirl.analysis.attention import Measured, Sample


def write_overlays(outdir: Path, sample: Sample, measured: dict[str, Measured]) -> None:
    """One PNG per tile (image | prior map | each backbone's head-averaged attention, the untrained
    reference first) and overview.png with all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from dirl.store import atomic_path

    outdir.mkdir(parents=True, exist_ok=True)
    n_classes = sample.n_classes if sample.priors is not None else 0
    colours = [(1, 1, 1), (0.95, 0.75, 0.85)] + [plt.cm.tab10(i % 10)[:3] for i in range(max(0, n_classes - 2))]
    cmap = ListedColormap(colours) if n_classes else None
    names = list(measured)
    ncol = 1 + (1 if n_classes else 0) + len(names)
    n = min(len(sample.ids), min(len(m.maps) for m in measured.values()))

    def draw(axes, i):
        img = sample.images[i]
        axes[0].imshow(img)
        axes[0].set_title(f"{sample.ids[i][0]} #{sample.ids[i][1]}", fontsize=8)
        c = 1
        if n_classes:
            axes[1].imshow(sample.priors[i], cmap=cmap, vmin=-0.5, vmax=n_classes - 0.5, interpolation="nearest")
            axes[1].set_title("prior map", fontsize=8)
            c = 2
        vmax = max(float(measured[k].maps[i].max()) for k in names)  # one scale per tile: sparsity shows
        for j, k in enumerate(names):
            m = measured[k].maps[i][None, None].float()
            up = F.interpolate(m, size=img.shape[:2], mode="nearest")[0, 0].numpy()
            axes[c + j].imshow(img)
            axes[c + j].imshow(up, cmap="inferno", alpha=0.6, interpolation="nearest", vmin=0, vmax=vmax)
            axes[c + j].set_title(f"{k}  heads H={measured[k].headline[i]:.3f}", fontsize=8)
        for ax in axes:
            ax.axis("off")

    for i in range(n):
        fig, axes = plt.subplots(1, ncol, figsize=(2.6 * ncol, 2.8))
        draw(np.atleast_1d(axes), i)
        fig.tight_layout()
        sid, row = sample.ids[i]
        with atomic_path(outdir / f"{sid}_{row}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
    if n:
        fig, axes = plt.subplots(n, ncol, figsize=(2.6 * ncol, 2.6 * n), squeeze=False)
        for i in range(n):
            draw(axes[i], i)
        fig.tight_layout()
        with atomic_path(outdir / "overview.png") as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
