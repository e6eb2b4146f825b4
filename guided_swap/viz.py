"""Pictures of maps: pure functions on arrays/tensors, plus one figure per batch (METHODS.md's recipe).

>>> import numpy as np
>>> m = np.array([[0.0, 1.0], [2.0, 3.0]])
>>> minmax(m).tolist()
[[0.0, 0.3333333333333333], [0.6666666666666666, 1.0]]
>>> standardize_clip(m).round(3).tolist()
[[0.366, 0.455], [0.545, 0.634]]
"""
from typing import Optional, Sequence

import numpy as np

from ._files import atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_numpy(a) -> np.ndarray:
    """A tensor (any device, with or without grad) or array as a float64 numpy array."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def standardize_clip(m, saturation: float = 0.1, brightness: float = 0.5) -> np.ndarray:
    """``clip((m - mean) / max(std, 1e-7) * saturation + brightness, 0, 1)``."""
    m = to_numpy(m)
    return np.clip((m - m.mean()) / max(m.std(), 1e-7) * saturation + brightness, 0.0, 1.0)


def minmax(m) -> np.ndarray:
    """Scale to [0, 1]; a constant map becomes zeros."""
    m = to_numpy(m)
    low, high = m.min(), m.max()
    return np.zeros_like(m) if high - low < 1e-12 else (m - low) / (high - low)


def grayscale(gradient, absolute: bool = False) -> np.ndarray:
    """Max over colour channels of a (C, H, W) map (of its absolute value for plain gradients): (H, W)."""
    g = to_numpy(gradient)
    if g.ndim != 3:
        raise ValueError(f"expected a (C, H, W) map, got shape {g.shape}")
    return (np.abs(g) if absolute else g).max(axis=0)


def to_rgb(m) -> np.ndarray:
    """A (C, H, W) map, standardised and clipped, as an (H, W, 3) picture (grey for one channel)."""
    g = standardize_clip(m)
    g = np.repeat(g, 3, axis=0) if g.shape[0] == 1 else g[:3]
    return np.transpose(g, (1, 2, 0))


def denormalize(image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A normalised (C, H, W) input back to an (H, W, 3) picture in [0, 1]."""
    x = to_numpy(image)
    channels = x.shape[0]
    mean, std = np.asarray(mean[:channels]).reshape(-1, 1, 1), np.asarray(std[:channels]).reshape(-1, 1, 1)
    x = np.clip(x * std + mean, 0.0, 1.0)
    x = np.repeat(x, 3, axis=0) if channels == 1 else x[:3]
    return np.transpose(x, (1, 2, 0))


def colormap(heat, cmap: str = "jet") -> np.ndarray:
    """An (H, W) map in [0, 1] through a matplotlib colour map: (H, W, 3)."""
    from matplotlib import colormaps

    return colormaps[cmap](np.clip(to_numpy(heat), 0.0, 1.0))[..., :3]


def overlay(image, heat, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped (H, W) map in [0, 1] over an (H, W, 3) picture in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = to_numpy(image)
    if image.shape[:2] != to_numpy(heat).shape:
        raise ValueError(f"image {image.shape[:2]} and map {to_numpy(heat).shape} differ in size")
    return np.clip((1 - alpha) * image + alpha * colormap(heat, cmap), 0.0, 1.0)


def figure(explanation, inputs, probabilities=None, labels: Optional[Sequence[str]] = None,
           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, alpha: float = 0.5,
           notes: Optional[Sequence[str]] = None):
    """A matplotlib figure, one row per image: input | guided backprop | Grad-CAM overlay | Guided Grad-CAM.

    Rows are titled with the target and its predicted probability (softmax of the logits unless given), and
    ``notes[i]`` if given (a file name, the true label).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch

    batch = inputs.shape[0]
    if probabilities is None:
        probabilities = torch.softmax(explanation.logits.float(), dim=1)
    has_cam = bool(explanation.layers)
    columns = ["input", f"{explanation.rule} backprop"] + (["Grad-CAM", "Guided Grad-CAM"] if has_cam else [])
    fig, axes = plt.subplots(batch, len(columns), figsize=(2.6 * len(columns), 2.7 * batch), squeeze=False)
    for i in range(batch):
        picture = denormalize(inputs[i], mean, std)
        target = int(explanation.target[i]) if explanation.target is not None else None
        name = labels[target] if labels is not None and target is not None else target
        probability = float(probabilities[i, target]) if target is not None else float("nan")
        panels = [picture, to_rgb(explanation.gradient[i])]
        if has_cam:
            panels += [overlay(picture, minmax(explanation.cam[i]), alpha), to_rgb(explanation.guided_gradcam[i])]
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].axis("off")
            title = f"{name}: p={probability:.2f}" + (f"\n{notes[i]}" if notes is not None else "")
            axes[i, j].set_title(columns[j] if j else title, fontsize=9)
    fig.tight_layout()
    return fig


def save_png(fig_or_array, path: str) -> str:
    """Write a figure or an (H, W[, 3]) array in [0, 1] to a PNG, atomically."""
    with atomic_write(path, suffix=".png") as temporary:
        if hasattr(fig_or_array, "savefig"):
            import matplotlib.pyplot as plt

            fig_or_array.savefig(temporary, dpi=110)
            plt.close(fig_or_array)
        else:
            from skimage import io as skio

            skio.imsave(temporary, (np.clip(to_numpy(fig_or_array), 0, 1) * 255).astype(np.uint8), check_contrast=False)
    return path
