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
from .text import shown  # noqa: E402


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
    ax.set_title(_label(title, 100))  # the run's name in it: escaped, its dollar signs literal
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


LABELLED_CELLS = 30  # classes up to which each cell shows its count and each class its name on both axes
NAMED_TICKS = 60  # classes up to which the axes name every class; past it, class numbers at a few ticks


def _label(text: str, most: int = 24) -> str:
    """A user's name as a figure's text: escaped (text.shown), cut to ``most`` characters, and its
    dollar signs literal (two of them would otherwise start a formula that may not parse)."""
    text = shown(text)
    return (text if len(text) <= most else text[:most - 1] + "…").replace("$", r"\$")


def confusion_heatmap(cm: list[list[int]], class_names: list[str], path: Path, title: str = "") -> None:
    """Counts in each cell, rows = true class, columns = predicted class. Bounded however many classes
    there are: the figure grows with them up to 20 inches; past ``LABELLED_CELLS`` classes the cells
    carry no counts, past ``NAMED_TICKS`` the axes show class numbers (the run's class_names order)."""
    cm = np.asarray(cm)
    n = len(class_names)
    size = min(20.0, max(4.0, 0.6 * n + 2)) if n <= LABELLED_CELLS else 12.0
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    if n <= NAMED_TICKS:
        small = {"fontsize": 6} if n > LABELLED_CELLS else {}
        ax.set_xticks(range(n), [_label(c) for c in class_names], rotation=45, ha="right", **small)
        ax.set_yticks(range(n), [_label(c) for c in class_names], **small)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(10, integer=True))
        ax.set_xlabel(f"predicted (class number, of {n})")
        ax.set_ylabel("true (class number)")
    ax.set_title(_label(title or "confusion matrix (test)", 100))
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n if n <= LABELLED_CELLS else 0):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)


def plot_run(run_dir: Path, history: list[dict], best_epoch: int | None, cm, class_names,
             boundary: int | None = None) -> None:
    """loss.png, accuracy.png and confusion_matrix.png of one run (no ``cm``, several labels per
    image: no confusion matrix, and the accuracy is the subset accuracy)."""
    name = Path(run_dir).name
    curve(history, "loss", best_epoch, f"{name}: {'' if cm is not None else 'binary '}cross-entropy loss",
          run_dir / "loss.png", boundary)
    curve(history, "accuracy", best_epoch, f"{name}: {'accuracy' if cm is not None else 'subset accuracy'}",
          run_dir / "accuracy.png", boundary)
    if cm is not None:
        confusion_heatmap(cm, class_names, run_dir / "confusion_matrix.png", f"{name}: confusion matrix (test)")


def image_grid(images, labels, class_names: list[str], path: Path, columns: int | None = None, title: str = "",
               captions: list[str] | None = None) -> None:
    """A grid of uint8 (N, 3, H, W) images, each titled with its label (or its caption). A
    captioned grid (the most confident mistakes, photos under a Grad-CAM heat map for a transfer
    run) has up to 4 columns of cells as large as the pictures' own pixels, up to 3 inches (330
    pixels), so the photo under the heat map can be seen; the labelled grid (samples.png) 6 small
    ones."""
    n = len(images)
    cell, font = 1.8, 8
    if captions is not None:
        width = np.asarray(images[0]).shape[-1] if n else 0
        cell, font = float(np.clip(width / 80, 1.8, 3.0)), 9
    columns = columns or (6 if captions is None else max(1, min(4, n)))
    rows = max(1, -(-n // columns))
    height = rows * (cell + 0.1) + (0.4 if captions is not None and title else 0)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * cell, height))
    if captions is not None:  # the pictures, not the margins, take the room; the title above the captions
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (0.65 if title else 0.3) / height,
                            wspace=0.05, hspace=0.15)
    for ax in np.atleast_1d(axes).flat:
        ax.axis("off")
    if captions is not None and not n:  # no mistakes: say so rather than show an empty frame
        np.atleast_1d(axes).flat[0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=12, color="grey")
    captions = captions or [class_names[int(label)] for label in labels]
    for ax, image, caption in zip(np.atleast_1d(axes).flat, images, captions):
        ax.imshow(np.asarray(image).transpose(1, 2, 0))
        ax.set_title(_label(caption, 60), fontsize=font)  # class names: escaped, "$" literal
    if title:
        fig.suptitle(title)
    _save(fig, path)
