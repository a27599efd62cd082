"""Training curves as a PNG: the one plotter behind RUN/loss.png and the report card's training panel.

    records = [json.loads(line) for line in open("runs/tiny/metrics.jsonl")]
    plot_training_curves(records, Path("runs/tiny/loss.png"), panels=("loss", "val_bpb"))

``records`` are the rows of a run's metrics.jsonl. Each panel plots one kind of record against the step:
``loss`` (train loss, with the validation loss as dots), ``val_bpb`` (validation bits per byte), ``lr``
and ``tokens_per_second``. Non-finite values (a NaN loss that the loop skipped) are left out. A panel
with nothing logged says so instead of disappearing, so the layout of a report does not jump around.

matplotlib runs with the Agg backend (no display needed) and is imported only when a plot is drawn; the
file is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from lmstack.atomic import write_atomic

# panel name -> (record key, y label, title); "loss" also draws val_loss
PANELS: dict[str, tuple[str, str, str]] = {
    "loss": ("loss", "loss (nats/token)", "loss"),
    "val_bpb": ("val_bpb", "bits per byte", "validation bits per byte"),
    "lr": ("lr", "learning rate", "learning rate"),
    "tokens_per_second": ("tokens_per_second", "tokens / s", "throughput"),
    # RL stages (lmstack grpo / ppo)
    "reward": ("reward", "mean reward", "rollout reward"),
    "val_reward": ("val_reward", "mean reward", "held-out reward (greedy)"),
    "kl_ref": ("kl_ref", "KL (nats/token)", "KL to the reference"),
    "kl_old": ("kl_old", "KL (nats/token)", "KL to the rollout policy"),
    "kl": ("kl", "KL (nats/sequence)", "KL to the reference per response"),
    "entropy": ("entropy", "nats/token", "policy entropy"),
    "clip_fraction": ("clip_fraction", "share of tokens", "clip fraction"),
    "response_length": ("response_length", "tokens", "response length"),
    "value_loss": ("value_loss", "loss", "value loss"),
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in records if "step" in r and _finite(r.get(key))]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_training_curves(records: Sequence[dict], out_png: Path,
                         panels: Sequence[str] = ("loss", "val_bpb", "lr", "tokens_per_second"),
                         title: str = "") -> bool:
    """Draw ``panels`` (names in :data:`PANELS`) side by side (two rows when there are more than two).

    Returns False, writing nothing, when the records hold neither a train nor a validation loss.
    """
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise ValueError(f"unknown panels {unknown}; choose from {sorted(PANELS)}")
    train_steps, train_loss = _series(records, "loss")
    val_steps, val_loss = _series(records, "val_loss")
    if not train_steps and not val_steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = (1, len(panels)) if len(panels) <= 2 else (2, math.ceil(len(panels) / 2))
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols + 0.5, 3.5 * rows + 0.5), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        key, ylabel, panel_title = PANELS[name]
        if name == "loss":
            if train_steps:
                ax.plot(train_steps, train_loss, label="train loss", lw=1)
            if val_steps:
                ax.plot(val_steps, val_loss, "o-", label="val loss", ms=3)
            ax.legend()
            panel_title = title or panel_title
        else:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, "o-" if key.startswith("val_") else "-", ms=3, lw=1)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    write_atomic(out_png, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    return True
