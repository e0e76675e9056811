"""Learning curves and confusion-matrix heatmaps as PNG files."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def curve(history: list[dict], key: str, best_epoch: int | None, title: str, path: Path,
          boundary: int | None = None) -> None:
    """Train (dashed) and validation (solid) ``key`` per epoch, with the best epoch marked (and
    the first fine-tuning epoch, when there is one)."""
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r[key] for r in history], "--o", ms=3, label=f"train {key}")
    if all(f"val_{key}" in r for r in history):  # none with --val-split 0
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "-o", ms=3, label=f"val {key}")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", ls=":", label=f"best epoch ({best_epoch})")
    if boundary:
        ax.axvline(boundary - 0.5, color="tab:red", ls="-.", alpha=0.6, label="fine-tuning starts")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def confusion_heatmap(cm: list[list[int]], class_names: list[str], path: Path, title: str = "") -> None:
    """Counts in each cell, rows = true class, columns = predicted class."""
    cm = np.asarray(cm)
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (test)")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)


def plot_run(run_dir: Path, history: list[dict], best_epoch: int | None, cm, class_names,
             boundary: int | None = None) -> None:
    """loss.png, accuracy.png and confusion_matrix.png of one run."""
    name = Path(run_dir).name
    curve(history, "loss", best_epoch, f"{name}: cross-entropy loss", run_dir / "loss.png", boundary)
    curve(history, "accuracy", best_epoch, f"{name}: accuracy", run_dir / "accuracy.png", boundary)
    confusion_heatmap(cm, class_names, run_dir / "confusion_matrix.png", f"{name}: confusion matrix (test)")


def image_grid(images, labels, class_names: list[str], path: Path, columns: int = 6, title: str = "",
               captions: list[str] | None = None) -> None:
    """A grid of uint8 (N, 3, H, W) images, each titled with its label (or its caption)."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.8, rows * 1.9))
    for ax in np.atleast_1d(axes).flat:
        ax.axis("off")
    captions = captions or [class_names[int(label)] for label in labels]
    for ax, image, caption in zip(np.atleast_1d(axes).flat, images, captions):
        ax.imshow(np.asarray(image).transpose(1, 2, 0))
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)
