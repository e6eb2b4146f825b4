"""How far to believe a map: the model-randomisation test and a localisation check on planted evidence.

* :func:`model_randomization` (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): re-initialise the
  model's layers from the top down, one block more at each step, and measure how similar each method's map
  stays (SSIM and Spearman rank correlation). A map that stays similar while the weights it should explain
  are destroyed is not explaining the model. Guided backprop is known to fail this; check your own model.
* :func:`data_randomization`: the same comparison against a model trained on shuffled labels.
* :func:`localization`: pointing-game accuracy and energy inside the box on images whose evidence is planted
  at a known place (:func:`planted_dataset`, :func:`train_planted`).

>>> from guided_swap import demo, sanity
>>> model, x, _ = demo.load_demo()
>>> table = sanity.model_randomization(model, x[:2], layer="auto", max_steps=2)
>>> sorted({row["method"] for row in table})
['deconvnet', 'gradcam', 'gradient', 'guided', 'guided_gradcam']
"""
import argparse
import copy
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy.stats import rankdata
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from .._files import atomic_write
from ..run.convert import convert
from ..core.rules import rules
from ..media import viz
from ..media.viz import minmax
from . import demo
from .demo import DemoCNN



def methods() -> Tuple[str, ...]:
    """The maps compared: one per registered rule (``guided_swap.core.rules()``), then Grad-CAM and Guided Grad-CAM."""
    return rules() + ("gradcam", "guided_gradcam")


# --- the maps compared -------------------------------------------------------------------------------

def method_maps(model: nn.Module, x: Tensor, target: Tensor, layer: str) -> Dict[str, np.ndarray]:
    """(B, H, W) grey maps of every method: max over channels of |map|, and the upsampled Grad-CAM."""
    maps = {}
    for rule in rules():
        e = convert(model, layer=layer, rule=rule, example_input=x[:1]).explain(x, target)
        maps[rule] = e.gradient.abs().amax(dim=1).numpy()
        maps.setdefault("gradcam", e.cam.numpy())  # Grad-CAM takes ordinary gradients under every rule
        if rule == "guided":
            maps["guided_gradcam"] = e.guided_gradcam.abs().amax(dim=1).numpy()
    return maps


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (0 when either is constant)."""
    ra, rb = _ranks(a.ravel()), _ranks(b.ravel())
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    return rankdata(values)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two maps after min-max normalisation to [0, 1] (window 7, or the map's odd side if smaller)."""
    side = min(a.shape)
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        raise ValueError(f"SSIM needs maps of at least 3 x 3, got {a.shape}")
    return float(structural_similarity(minmax(a), minmax(b), data_range=1.0, win_size=window))


def compare(reference: Dict[str, np.ndarray], other: Dict[str, np.ndarray]) -> Dict[str, Tuple[float, float]]:
    """Mean SSIM and Spearman over the batch, per method."""
    result = {}
    for method in reference:
        pairs = list(zip(reference[method], other[method]))
        result[method] = (float(np.mean([ssim(a, b) for a, b in pairs])),
                          float(np.mean([spearman(a, b) for a, b in pairs])))
    return result


# --- model and data randomisation ------------------------------------------------------------------

def blocks_top_down(model: nn.Module) -> List[str]:
    """The model's top-level children that hold parameters, from the output end to the input end.

    Registration order is taken as forward order (true for torchvision models and most code)."""
    names = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    return names[::-1]


def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameterised layer of ``module`` in place (weights ~ the layer's own init scale)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                if sub.affine:
                    sub.weight.copy_(torch.rand(sub.weight.shape, generator=generator) + 0.5)
                    sub.bias.copy_(torch.randn(sub.bias.shape, generator=generator) * 0.1)
            elif getattr(sub, "weight", None) is not None and sub.weight.dim() > 1:
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()


def model_randomization(model: nn.Module, x: Tensor, layer: str = "auto", target=None, max_steps: Optional[int] = None,
                        seed: int = 0) -> List[dict]:
    """Cascading randomisation: rows ``{step, randomized, method, ssim, spearman}``, step 0 = the model itself.

    The explained class stays the trained model's prediction at every step. Works on a copy.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        target = model(x).argmax(1) if target is None else torch.as_tensor(target)
    reference = method_maps(model, x, target, layer)
    rows = _rows(0, "none", compare(reference, reference))
    generator = torch.Generator().manual_seed(seed)
    for step, name in enumerate(blocks_top_down(model)[:max_steps], start=1):
        randomize(model.get_submodule(name), generator)
        rows += _rows(step, name, compare(reference, method_maps(model, x, target, layer)))
    return rows


def data_randomization(model: nn.Module, random_label_model: nn.Module, x: Tensor, layer: str = "auto", target=None):
    """Similarity of each method's maps between a model and one trained on shuffled labels."""
    with torch.no_grad():
        target = model(x).argmax(1) if target is None else torch.as_tensor(target)
    return _rows(1, "labels shuffled", compare(method_maps(model, x, target, layer),
                                                method_maps(random_label_model, x, target, layer)))


def _rows(step: int, name: str, scores: Dict[str, Tuple[float, float]]) -> List[dict]:
    return [{"step": step, "randomized": name, "method": method, "ssim": s, "spearman": r}
            for method, (s, r) in scores.items()]


def randomization_figure(model: nn.Module, x: Tensor, layer: str = "auto", max_steps: Optional[int] = None, seed: int = 0):
    """The classic figure for the first image: methods as rows, cascade steps as columns, each map min-max
    scaled on its own (this figure compares shapes, not strengths). A ``matplotlib.figure.Figure``: no pyplot."""
    model = copy.deepcopy(model).eval()
    x = x[:1]
    with torch.no_grad():
        target = model(x).argmax(1)
    columns = [("trained", method_maps(model, x, target, layer))]
    generator = torch.Generator().manual_seed(seed)
    for name in blocks_top_down(model)[:max_steps]:
        randomize(model.get_submodule(name), generator)
        columns.append((f"+ {name}", method_maps(model, x, target, layer)))
    fig = Figure(figsize=(1.6 * len(columns), 1.7 * len(methods())))
    axes = fig.subplots(len(methods()), len(columns), squeeze=False)
    for j, (title, maps) in enumerate(columns):
        for i, method in enumerate(methods()):
            axes[i, j].imshow(minmax(maps[method][0]), cmap="gray")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
            if j == 0:
                axes[i, j].set_ylabel(method, fontsize=8)
    fig.suptitle("cascading randomisation, top layer first", fontsize=9)
    fig.tight_layout()
    return fig


# --- planted evidence and localisation -------------------------------------------------------------

PATTERN = 7  # side of the planted pattern, pixels


def _texture(size: int, generator: torch.Generator) -> Tensor:
    noise = torch.rand(1, 1, size // 4, size // 4, generator=generator)
    smooth = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return (0.3 + 0.4 * smooth + 0.1 * torch.rand(1, 1, size, size, generator=generator)).clamp(0, 1)


def _pattern(kind: str) -> Tensor:
    p = torch.zeros(PATTERN, PATTERN)
    if kind == "cross":  # the evidence
        p[PATTERN // 2, :] = 1.0
        p[:, PATTERN // 2] = 1.0
    else:  # a distractor of the same brightness and size: a hollow square
        p[0, :] = p[-1, :] = p[:, 0] = p[:, -1] = 1.0
    return p


def planted_dataset(n: int, size: int = 48, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """``n`` grey images of texture, half with a cross (label 1) at a random place, all with a hollow square
    distractor elsewhere. Returns images (n, 1, size, size) in [0, 1], labels (n,), boxes (n, 4) as
    (top, left, bottom, right) of the cross (-1 where there is none)."""
    generator = torch.Generator().manual_seed(seed)
    images, labels, boxes = [], [], []
    for i in range(n):
        image = _texture(size, generator)[0, 0]
        label = i % 2
        places = []
        while len(places) < 2:
            top, left = (int(v) for v in torch.randint(0, size - PATTERN, (2,), generator=generator))
            if all(abs(top - t) > PATTERN + 1 or abs(left - l) > PATTERN + 1 for t, l in places):
                places.append((top, left))
        box = (-1, -1, -1, -1)
        for (top, left), kind in zip(places, ("cross" if label else "square", "square")):
            region = image[top:top + PATTERN, left:left + PATTERN]
            image[top:top + PATTERN, left:left + PATTERN] = torch.where(_pattern(kind) > 0, torch.ones(()), region)
            if kind == "cross":
                box = (top, left, top + PATTERN, left + PATTERN)
        images.append(image)
        labels.append(label)
        boxes.append(box)
    return torch.stack(images).unsqueeze(1), torch.tensor(labels), torch.tensor(boxes)


def train_planted(n: int = 600, epochs: int = 40, seed: int = 0) -> Tuple[nn.Module, float]:
    """The demo CNN architecture trained on planted evidence (a minute on 2 cores); returns it and its
    held-out accuracy on fresh images."""
    torch.manual_seed(seed)
    images, labels, _ = planted_dataset(n, seed=seed)
    x = (images - 0.5) / 0.25
    model = DemoCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(64):
            loss = F.cross_entropy(model(x[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    test_images, test_labels, _ = planted_dataset(200, seed=seed + 1000)
    with torch.no_grad():
        accuracy = float((model((test_images - 0.5) / 0.25).argmax(1) == test_labels).float().mean())
    return model, accuracy


def localization(model: nn.Module, x: Tensor, boxes: Tensor, target, layer: str = "auto", tolerance: int = 1) -> Dict[str, dict]:
    """Pointing-game accuracy (the map's maximum within ``tolerance`` pixels of the box) and the share of the
    map's positive energy inside the box, per method, over images that have a box."""
    has_box = boxes[:, 0] >= 0
    x, boxes, target = x[has_box], boxes[has_box], torch.as_tensor(target)[has_box]
    maps = method_maps(model, x, target, layer)
    result = {}
    for method, batch in maps.items():
        hits, energy = [], []
        for heat, (top, left, bottom, right) in zip(batch, boxes.tolist()):
            row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
            hits.append(top - tolerance <= row < bottom + tolerance and left - tolerance <= col < right + tolerance)
            positive = np.clip(heat, 0, None)
            total = positive.sum()
            energy.append(positive[top:bottom, left:right].sum() / total if total > 0 else 0.0)
        result[method] = {"pointing": float(np.mean(hits)), "energy_in_box": float(np.mean(energy)), "images": len(hits)}
    return result


# --- a report for the docs -----------------------------------------------------------------------------

def table_markdown(rows: List[dict]) -> str:
    steps = sorted({(r["step"], r["randomized"]) for r in rows})
    lines = ["| randomised up to | " + " | ".join(f"{m} SSIM / ρ" for m in methods()) + " |",
             "|---" * (len(methods()) + 1) + "|"]
    for step, name in steps:
        cells = {r["method"]: r for r in rows if r["step"] == step}
        lines.append(f"| {name} | " + " | ".join(f"{cells[m]['ssim']:.2f} / {cells[m]['spearman']:.2f}" for m in methods()) + " |")
    return "\n".join(lines)


def report(out_dir: str) -> str:
    """Run both checks on the demo model and the planted-evidence model; write markdown and figures."""
    os.makedirs(out_dir, exist_ok=True)
    model, x, _ = demo.load_demo()
    cascade = model_randomization(model, x)
    viz.save_png(randomization_figure(model, x), os.path.join(out_dir, "randomization_demo.png"))
    planted, accuracy = train_planted()
    images, labels, boxes = planted_dataset(200, seed=2000)
    xp = (images - 0.5) / 0.25
    located = localization(planted, xp, boxes, labels)
    planted_cascade = model_randomization(planted, xp[labels == 1][:8])
    text = ["## Model randomisation on the demo CNN (8 images)", "", table_markdown(cascade), "",
            "![cascading randomisation](randomization_demo.png)", "",
            f"## Planted evidence (CNN held-out accuracy {accuracy:.3f})", "",
            "| method | pointing game | energy in box |", "|---|---|---|"]
    text += [f"| {m} | {v['pointing']:.3f} | {v['energy_in_box']:.3f} |" for m, v in located.items()]
    text += ["", "## Model randomisation on the planted-evidence CNN", "", table_markdown(planted_cascade), ""]
    path = os.path.join(out_dir, "sanity_results.md")
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write("\n".join(text))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the sanity checks on the demo and planted-evidence models")
    parser.add_argument("--out", default="docs")
    print(report(parser.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
