"""The offline demo: a small CNN trained here on scikit-image's ``lfw_subset`` (faces against non-faces).

The model calls ReLU the ways real code does (in-place ``nn.ReLU``, ``F.relu(..., inplace=True)``,
``Tensor.relu_``, and ``torch.relu`` in an MLP head after the last conv), so hook-based guided backprop gets
it wrong and guided_swap does not. Its weights ship in ``guided_swap/data/demo_cnn.pt``; retrain with
``python -m guided_swap.demo --train`` (seconds, deterministic).

>>> model, images, labels = load_demo()
>>> tuple(images.shape), labels[:2]
((8, 1, 48, 48), ['face', 'face'])
"""
import argparse
import functools
import os
import sys
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = os.path.join(os.path.dirname(__file__), "data", "demo_cnn.pt")
CLASSES = ("non-face", "face")
SIZE = 48
DEMO_INDICES = (3, 17, 42, 77, 105, 130, 161, 190)  # four faces, four non-faces


class DemoCNN(nn.Module):
    """Three conv blocks and an MLP head; 1 x 48 x 48 grey input, 2 classes."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.act = nn.ReLU(inplace=True)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, len(CLASSES))

    def forward(self, x):
        x = F.max_pool2d(self.act(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x)), inplace=True), 2)
        x = self.bn3(self.conv3(x)).relu_()
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def dataset() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 200 images of ``skimage.data.lfw_subset()`` at 48 x 48 (raw [0, 1]) and labels (1 = face)."""
    from skimage import data

    faces = torch.from_numpy(data.lfw_subset()).float().unsqueeze(1)
    images = F.interpolate(faces, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    labels = torch.cat([torch.ones(100), torch.zeros(100)]).long()  # the first 100 are faces
    return images, labels


def train(path: str = WEIGHTS, seed: int = 0, epochs: int = 120) -> float:
    """Train the demo CNN (deterministic) and save its weights; returns held-out accuracy."""
    torch.manual_seed(seed)
    images, labels = dataset()
    mean, std = float(images.mean()), float(images.std())
    x = (images - mean) / std
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, fit = order[:40], order[40:]
    model = DemoCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        model.train()
        batch = x[fit]
        batch = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, batch, batch.flip(-1))  # mirror half
        loss = F.cross_entropy(model(batch), labels[fit])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[test]).argmax(1) == labels[test]).float().mean())
    torch.save({"state_dict": model.state_dict(), "mean": mean, "std": std, "test_accuracy": accuracy,
                "test_indices": test.tolist(), "classes": CLASSES}, path)
    return accuracy


@functools.lru_cache(maxsize=1)
def checkpoint() -> dict:
    """The shipped demo checkpoint: weights, input mean/std, held-out accuracy (read once per process)."""
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


def load_demo() -> Tuple[nn.Module, torch.Tensor, List[str]]:
    """The trained demo model (eval mode), eight normalised demo images and their true labels."""
    stats = checkpoint()
    model = DemoCNN()
    model.load_state_dict(stats["state_dict"])
    images, labels = dataset()
    index = list(DEMO_INDICES)
    x = (images[index] - stats["mean"]) / stats["std"]
    return model.eval(), x, [CLASSES[int(labels[i])] for i in index]


def run_demo(out_dir: str = "guided_swap_demo") -> str:
    """Explain the demo images with every map and write ``demo.png``; returns its path."""
    from . import convert
    from .viz import figure, save_png

    model, x, truth = load_demo()
    stats = checkpoint()
    explainer = convert(model, layer="auto", example_input=x[:1])
    explanation = explainer.explain(x)
    fig = figure(explanation, x, labels=list(CLASSES), mean=(stats["mean"],), std=(stats["std"],),
                 notes=[f"true: {label}" for label in truth])
    return save_png(fig, os.path.join(out_dir, "demo.png"))


def rules_figure(path: str, count: int = 4) -> str:
    """The three backward rules side by side on demo images (the picture in docs/methods.md)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from . import convert
    from .viz import denormalize, save_png, to_rgb

    model, x, _ = load_demo()
    stats = checkpoint()
    x = x[[0, 1, 4, 5][:count]]
    rules = ("gradient", "deconvnet", "guided")
    maps = {rule: convert(model, layer=None, rule=rule).explain(x).gradient for rule in rules}
    fig, axes = plt.subplots(len(x), 4, figsize=(8, 2.1 * len(x)), squeeze=False)
    for i in range(len(x)):
        panels = [denormalize(x[i], (stats["mean"],), (stats["std"],))] + [to_rgb(maps[r][i]) for r in rules]
        for j, (panel, title) in enumerate(zip(panels, ("input",) + rules)):
            axes[i, j].imshow(panel)
            axes[i, j].axis("off")
            axes[i, j].set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the demo CNN, or run the demo")
    parser.add_argument("--train", action="store_true", help=f"retrain and overwrite {WEIGHTS}")
    args = parser.parse_args(argv)
    if args.train:
        print(f"held-out accuracy {train():.3f}; weights in {WEIGHTS}")
    else:
        print(run_demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
