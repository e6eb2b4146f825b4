"""SmoothGrad in one call: ``explainer.explain(x, smooth=N, noise=σ)`` (Smilkov et al. 2017).

Each input gets ``N`` noisy copies ``x_i + σ_i · ε``, ``ε ~ 𝒩(0, 1)``, where ``σ_i = noise · (max(x_i) − min(x_i))``
is a fraction of that input's value range, as in the paper (10-20% works well). The copies are explained in
chunks of ``chunk`` inputs, so memory stays that of one plain ``explain`` on ``chunk`` inputs, and every map is the
mean over the copies of the map of each copy:

- ``gradient``: the mean of the copies' input gradients (under the explainer's rule);
- ``cams[name]`` / ``cams_raw[name]``: the mean of each copy's CAM (ReLU applied per copy), for every CAM
  registered when ``explain`` is called; ``cam``/``cam_raw`` are the ``"gradcam"`` entry;
- ``guided_gradcam``: the smoothed Grad-CAM times the smoothed gradient;
- ``layers[L].activation`` / ``grad``: the means of the copies' captures; ``score``: the mean explained score.

The target is resolved once, on the clean input (``None`` is its argmax); a callable or a
:class:`~guided_swap.Channel` target is a score function and is applied to each copy. ``logits`` and ``outputs``
are the clean input's. The noise is drawn copy by copy in sample-major order (sample 0's ``N`` copies, then
sample 1's), each with ``torch.randn(x.shape[1:], generator=generator)``: the same generator state gives the same
noise whatever ``chunk`` is, and the same order as Captum's ``NoiseTunnel``.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> e = ex.explain(torch.randn(2, 3, 64, 64), smooth=4, noise=0.15, generator=torch.Generator().manual_seed(0))
>>> tuple(e.gradient.shape), tuple(e.cams["layercam"].shape), e.smoothing["copies"]
((2, 3, 64, 64), (2, 64, 64), 4)
"""
import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..capture.base import Capture
from ..core import cam as cam_maths
from ..core.maps import Explanation, LayerMaps, detach_tree
from ..core.targets import ClassScore, Score, explained_logits
from .assemble import explanation_of


def check(smooth: Any, noise: Any, generator: Any, chunk: Any, x: Tensor) -> None:
    """Refuse smoothing settings that would be ignored or meaningless."""
    if smooth is None:
        given = [name for name, value in (("noise", noise), ("generator", generator), ("chunk", chunk))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}= only apply with smooth=N (the number of noisy copies per input)")
        return
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth= is the number of noisy copies per input, an int >= 1; got {smooth!r}")
    if noise is not None and (isinstance(noise, bool) or not isinstance(noise, (int, float)) or
                              not math.isfinite(noise) or noise < 0):
        raise ValueError(f"noise= is the noise's standard deviation as a fraction of each input's value range "
                         f"(e.g. 0.15), a finite number >= 0; got {noise!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk= is how many noisy inputs go through one pass, an int >= 1; got {chunk!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator= takes a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"the generator is on {generator.device} but the input on {x.device}; create it with "
                             f"torch.Generator(device={str(x.device)!r})")


DEFAULT_NOISE = 0.15


def smooth_explain(capture: Capture, x: Any, score: Score, *, copies: int, noise: Optional[float],
                   generator: Optional[torch.Generator], chunk: Optional[int], interpolate: str) -> Explanation:
    """The mean explanation of ``copies`` noisy copies of each input (see the module docstring). ``x`` is what
    the capture takes; the noise is added to it as one (B, C, ...) tensor (:meth:`Capture.stack`)."""
    noise = DEFAULT_NOISE if noise is None else float(noise)
    clean = capture.stack(x)
    batch = clean.shape[0]
    chunk = chunk or batch
    with torch.no_grad():
        outputs = capture(x)
    logits = explained_logits(outputs, capture.output, batch).detach()
    classes = score.classes_for(outputs, batch)  # class targets: resolved once, on the clean input
    sigma = noise * (clean.flatten(1).amax(dim=1) - clean.flatten(1).amin(dim=1))
    sums: Dict[str, Any] = {}
    names = cam_maths.cam_methods()
    for start in range(0, batch * copies, chunk):
        rows = torch.arange(start, min(start + chunk, batch * copies), device=clean.device) // copies
        eps = torch.stack([torch.randn(clean.shape[1:], generator=generator, dtype=clean.dtype, device=clean.device)
                           for _ in range(rows.numel())])
        noisy = clean[rows] + sigma[rows].view(-1, *([1] * (clean.dim() - 1))) * eps
        copy_score = score if classes is None else ClassScore(classes[rows], capture.output)
        result = capture.run(capture.unstack(noisy, like=x), copy_score)
        _accumulate(sums, explanation_of(capture, result, noisy.shape[2:], interpolate), rows, batch, names)
    return _mean_explanation(capture, sums, copies, logits, classes, outputs, clean, interpolate,
                             {"copies": copies, "noise": noise, "chunk": chunk})


def _add(sums: Dict[str, Any], key: str, rows: Tensor, value: Tensor, batch: int) -> None:
    if key not in sums:
        sums[key] = torch.zeros((batch,) + tuple(value.shape[1:]), dtype=value.dtype, device=value.device)
    sums[key].index_add_(0, rows, value.detach())


def _accumulate(sums: Dict[str, Any], part: Explanation, rows: Tensor, batch: int, names) -> None:
    _add(sums, "gradient", rows, part.gradient, batch)
    _add(sums, "score", rows, part.score, batch)
    for layer, maps in part.layers.items():
        _add(sums, f"{layer}/activation", rows, maps.activation, batch)
        _add(sums, f"{layer}/grad", rows, maps.grad, batch)
        if maps.layout.kind == "unknown":
            continue  # no CAM; asking for one raises the layout's error
        for name in names:
            _add(sums, f"{layer}/cam/{name}", rows, maps.cams_raw[name], batch)


def _mean_explanation(capture: Capture, sums, copies, logits, classes, outputs, x, interpolate,
                      settings) -> Explanation:
    layouts = capture.layouts
    layers = {}
    for layer in capture.layers:
        prefix = f"{layer}/cam/"
        cams = {key[len(prefix):]: value / copies for key, value in sums.items() if key.startswith(prefix)}
        maps = LayerMaps(sums[f"{layer}/activation"] / copies, sums[f"{layer}/grad"] / copies, tuple(x.shape[2:]),
                         interpolate, name=layer, fixed_cams=cams if cams else None)
        if layer in layouts:
            maps.layout = layouts[layer]
        layers[layer] = maps
    return Explanation(logits, classes, sums["score"] / copies, sums["gradient"] / copies, layers,
                       detach_tree(outputs), capture.rule.name, len(capture.swapped), smoothing=settings)
