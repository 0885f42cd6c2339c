"""Layers x heads heat maps of scores."""

from __future__ import annotations

from pathlib import Path

from prunetune.importance.scores import Scores


def heatmap(scores: list[Scores], titles: list[str], path: str | Path) -> Path:
    """Layers x heads heat map(s), side by side, as PNG; scores of whole layers only (block_influence) as one
    column per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 4), squeeze=False)
    for ax, s, title in zip(axes[0], scores, titles, strict=True):
        keys, mat = s.head_matrix()
        xlabel = "head"
        if not keys and s.layers:
            keys, mat, xlabel = list(s.layers), [[v] for v in s.layers.values()], "layer score"
        im = ax.imshow(np.array(mat, dtype=float).reshape(len(keys), -1), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
