"""Pictures as RGB arrays for a person to look at: panels laid out in a grid with titles, boxes and text (what
pretrain/visualize.py and each objective's `pictures` draw with), written by runtime/observe to PNG and TensorBoard."""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np


def rgb(pixels: np.ndarray, hidden: np.ndarray | None = None) -> np.ndarray:
    """uint8 (S, S), (S, S, 1) or (S, S, 3) -> float RGB in [0, 1] for display; `hidden` pixels drawn grey-blue."""
    pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    rgb = (np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels).astype(np.float32) / 255.0
    if hidden is not None:
        rgb[hidden] = (0.35, 0.35, 0.45)
    return rgb


def overlay(pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    up = np.kron(weights, np.ones((pixels.shape[0] // weights.shape[0],) * 2))
    up = (up - up.min()) / max(float(up.max() - up.min()), 1e-12)
    return 0.55 * rgb(pixels) + 0.45 * colormaps["inferno"](up)[..., :3]


def text_panel(lines: list[str]) -> dict:
    return {"text": "\n".join(lines)}


def grid_figure(rows: list[list[Any]], columns: list[str], title: str) -> np.ndarray:
    """Rows of panels (an RGB array; a dict with 'image', optional 'boxes' [(cx, cy, w, h fractions, colour)] and
    'title'; or a dict with 'text') under column titles -> an RGB uint8 picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    width = [2.8 if isinstance(panel, dict) and "text" in panel else 1.6 for panel in rows[0]]
    fig, axes = plt.subplots(
        len(rows),
        len(rows[0]),
        figsize=(sum(width), 1.7 * len(rows) + 0.4),
        squeeze=False,
        gridspec_kw={"width_ratios": width},
    )
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            panel = panel if isinstance(panel, dict) else {"image": panel}
            if "text" in panel:
                ax.axis("off")
                ax.text(0.0, 0.5, panel["text"], family="monospace", fontsize=7, va="center")
            else:
                ax.imshow(panel["image"])
                size = panel["image"].shape[0]
                for (cx, cy, w, h), color in panel.get("boxes", []):
                    ax.add_patch(
                        Rectangle(
                            ((cx - w / 2) * size, (cy - h / 2) * size),
                            w * size,
                            h * size,
                            fill=False,
                            edgecolor=color,
                            linewidth=1.2,
                        )
                    )
            heading = [columns[c]] if r == 0 and c < len(columns) else []
            if heading or "title" in panel:
                ax.set_title("\n".join(heading + ([panel["title"]] if "title" in panel else [])), fontsize=7)
    fig.suptitle(textwrap.fill(title, int(12 * sum(width))), fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture
