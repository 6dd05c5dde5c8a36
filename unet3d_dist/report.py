"""Pictures written into the run directory: the loss curve and slice panels."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402


def plot_loss_curve(metrics_file: Path, out_png: Path) -> None:
    """Training loss (and validation Dice, if logged) against the optimizer step."""
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["val/dice"]) for r in rows if "val/dice" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="train loss (Dice + CE)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    top, lines = ax, list(ax.get_lines())
    if val:
        top = ax.twinx()
        lines += top.plot(*zip(*val), "o-", color="tab:orange", label="validation Dice")
        top.set_ylabel("validation Dice")
        top.set_ylim(0, 1)
    # One legend, mid-height on the right: the loss has fallen low there and the Dice risen high.
    top.legend(handles=lines, loc="center right")
    ax.set_title(Path(out_png).parent.name)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def outline(ax: plt.Axes, mask: np.ndarray, color: str) -> None:
    """Contour of a 2-D mask on imshow's pixel grid, closed along the image edge (a mask filling the slice too)."""
    if not mask.any():
        return
    rows, cols = mask.shape
    padded = np.pad(mask.astype(np.float32), 1)
    ax.contour(np.arange(-1, cols + 1), np.arange(-1, rows + 1), padded, levels=[0.5], colors=color, linewidths=1.2)


DISPLAY_WINDOWS = {"CT": (-160.0, 240.0)}  # raw-HU scans in predict: the abdominal soft-tissue window (W400, L40)


def focus_slices(mask: np.ndarray | None, shape: tuple[int, ...]) -> list[int]:
    """Per axis, the slice holding most of ``mask`` (so each view cuts through the structure, whatever its shape);
    the middle slices when there is nothing to show."""
    if mask is None or not mask.any():
        return [s // 2 for s in shape]
    axes = range(mask.ndim)
    return [int(np.argmax(mask.sum(axis=tuple(a for a in axes if a != axis)))) for axis in axes]


def panel_focus(reference: np.ndarray | None, prediction: np.ndarray, many: bool) -> np.ndarray | None:
    """The mask the slices go through: the prediction (what predict has), but the reference when there are ``many``
    classes: a poor model's prediction may cover the whole scan, and the organs are what the picture is for."""
    if many and reference is not None and reference.any():
        return reference > 0
    return prediction > 0 if prediction.any() else (reference > 0 if reference is not None else None)


def caption(
    fig: plt.Figure, title: str, reference: np.ndarray | None, prediction: np.ndarray, classes: list[str] | None
) -> None:
    """The title and what the colours mean: with ``classes`` (the labels are filled) a legend naming the classes
    shown, else a line naming the outlines."""
    if classes is not None:
        shown = np.union1d(np.unique(prediction), np.unique(reference) if reference is not None else [])
        handles = [Patch(color=colour_of(c), label=classes[int(c)]) for c in shown if c]
        fig.suptitle(title)
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4) or 1, frameon=False)
    else:
        legend = "reference: green, prediction: red" if reference is not None else "prediction: red"
        fig.suptitle(f"{title}\n{legend}")


def slice_panel(
    image: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray,
    spacing: tuple[float, float, float],
    out_png: Path,
    title: str,
    window: tuple[float, float] | None = None,
    classes: list[str] | None = None,
) -> None:
    """Sagittal, coronal and axial slices through the prediction (else the reference); reference green, prediction
    red. Gray values span ``window`` (e.g. ``DISPLAY_WINDOWS["CT"]`` for HU), else the image's 0.5-99.5 percentiles.

    With several foreground classes (``classes`` names each label value, background first) outlines would tangle,
    so each class is filled in its own colour instead, the reference above the prediction, and a legend names them.
    Arrays are (x, y, z); aspect ratios follow the voxel spacing so anisotropic scans are not distorted.
    """
    many = classes is not None and len(classes) > 2
    centre = focus_slices(panel_focus(reference, prediction, many), image.shape)
    # Radiological display for LPS arrays: superior up in sagittal/coronal views, anterior up in the axial view.
    views = [
        (f"sagittal (x = {centre[0]})", lambda a: a[centre[0], :, :].T, (spacing[1], spacing[2]), "lower"),
        (f"coronal (y = {centre[1]})", lambda a: a[:, centre[1], :].T, (spacing[0], spacing[2]), "lower"),
        (f"axial (z = {centre[2]})", lambda a: a[:, :, centre[2]].T, (spacing[0], spacing[1]), "upper"),
    ]
    low, high = window or np.percentile(image, [0.5, 99.5])
    if not many:
        rows = [("", None)]  # outlines of both in one row
    elif reference is None:
        rows = [("prediction", prediction)]
    else:
        rows = [("reference", reference), ("prediction", prediction)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 5.4 * len(rows)), squeeze=False, layout="constrained")
    for (row_name, labels), row_axes in zip(rows, axes):
        for ax, (name, take, (sx, sy), origin) in zip(row_axes, views):
            ax.imshow(
                take(image), cmap="gray", vmin=low, vmax=high, origin=origin, aspect=sy / sx, interpolation="nearest"
            )
            if many:
                ax.imshow(class_colours(take(labels)), origin=origin, aspect=sy / sx, interpolation="nearest")
            else:
                if reference is not None:
                    outline(ax, take(reference) > 0, "lime")
                outline(ax, take(prediction) > 0, "red")
            ax.set_title(f"{row_name}: {name}" if row_name else name)
            ax.axis("off")
    caption(fig, title, reference, prediction, classes if many else None)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


CLASS_COLOURS = plt.get_cmap("tab20").colors


def colour_of(value: int) -> tuple[float, float, float]:
    """The RGB colour of label value ``value`` (> 0): colour value - 1 of tab20, repeating after 20 classes."""
    return CLASS_COLOURS[(int(value) - 1) % len(CLASS_COLOURS)]


def class_colours(labels: np.ndarray) -> np.ndarray:
    """RGBA overlay of a 2-D label slice: each class in its colour, half transparent; background clear."""
    rgba = np.zeros((*labels.shape, 4))
    for value in np.unique(labels):
        if value:
            rgba[labels == value] = (*colour_of(value), 0.55)
    return rgba
