"""The pretraining picture: losses against ln K, the collapse monitors, and the schedules, from log.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path


def plot_losses(log_path: Path, out_png: Path, out_dim: int | None = None) -> None:
    """Three panels: losses (with ln K, the loss of a teacher that says nothing), the teacher's entropies
    as fractions of ln K (collapse monitors), and the schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dirl.store import atomic_path

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if rows:
        steps = [r["step"] for r in rows]
        for key, style in (("loss", "-"), ("loss_dino", "--"), ("loss_dense", ":")):
            if any(r.get(key) for r in rows):
                axes[0].plot(steps, [r[key] for r in rows], style, label=key)
        if out_dim:
            axes[0].axhline(math.log(out_dim), color="grey", lw=0.8, ls="-.", label="ln K (uniform)")
        axes[0].set_ylabel("loss")
        for key, label in (
            ("teacher_entropy", "per-image entropy / ln K  (1: uniform targets)"),
            ("teacher_batch_entropy", "entropy of the batch mean / ln K  (0: one dimension)"),
        ):
            if any(key in r for r in rows):
                axes[1].plot(steps, [r.get(key, float("nan")) for r in rows], label=label)
        axes[1].set_ylim(0, 1.02)
        axes[1].set_ylabel("fraction of ln K")
        axes[2].plot(steps, [r["lr"] for r in rows], label="lr")
        ax2 = axes[2].twinx()
        ax2.plot(steps, [r["wd"] for r in rows], "C1", label="weight decay")
        ax2.plot(steps, [r["momentum"] for r in rows], "C2", label="teacher momentum")
        axes[2].set_ylabel("lr")
        axes[2].legend(loc="upper left")
        ax2.legend(loc="center right")
        for ax in axes:
            ax.set_xlabel("step")
        axes[0].legend()
        axes[1].legend(fontsize=8)
    axes[0].set_title(f"pretraining losses ({log_path.parent.name})")
    axes[1].set_title("teacher targets (collapse monitors)")
    axes[2].set_title("schedules")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
