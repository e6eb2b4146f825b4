"""SmoothGrad in one call: ``explainer.explain(x, smooth=N, noise=σ)`` (Smilkov et al. 2017), and its variants.

Each input gets ``N`` noisy copies ``x_i + σ_i · ε``, ``ε ~ 𝒩(0, 1)``, where ``σ_i = noise · (max(x_i) − min(x_i))``
is a fraction of that input's value range, as in the paper (10-20% works well), or ``σ_i = noise_absolute`` for
every input (Captum's ``stdevs``: a standard deviation in the input's own units; give one of the two). The copies
are explained in chunks of ``chunk`` inputs, so memory stays that of one plain ``explain`` on ``chunk`` inputs, and
every map is a statistic over the copies of the map of each copy, chosen by ``smooth_type`` (Captum NoiseTunnel's
``nt_type``): ``"smoothgrad"`` (the default) their mean, ``"smoothgrad_sq"`` the mean of their squares,
``"vargrad"`` their variance (the mean of the squares minus the squared mean, as Captum computes it). It applies to

- ``gradient``: the copies' input gradients (under the explainer's rule);
- ``cams_raw[name]``: each copy's CAM (ReLU applied per copy), for every CAM registered when ``explain`` is called;
  ``cams[name]`` is that map resized to the input (for the mean, the same as the mean of the resized maps);
  ``cam``/``cam_raw`` are the ``"gradcam"`` entry;
- ``guided_gradcam``: the smoothed Grad-CAM times the smoothed gradient.

``layers[L].activation`` / ``grad`` are the means of the copies' captures and ``score`` the mean explained score,
whatever ``smooth_type``. Sums run in float32 at least: a float16 or bfloat16 model's smoothed maps are float32.
``e.smoothing`` records ``{"copies", "type", "noise", "noise_absolute", "chunk"}`` (the noise not used is None).

The target is resolved once, on the clean input (``None`` is its argmax; a :class:`~guided_swap.Finer` target's
classes too); a callable or a :class:`~guided_swap.Channel` target is a score function and is applied to each copy.
``logits`` and ``outputs`` are the clean input's. The noise is drawn copy by copy in sample-major order (sample 0's
``N`` copies, then sample 1's), each with ``torch.randn(x.shape[1:], generator=generator)``: the same generator
state gives the same noise whatever ``chunk`` is, and the same order as Captum's ``NoiseTunnel``. With several
inputs (``explain((x1, x2), smooth=N)``) every input gets noise of its own range (one draw per input in turn for
each copy) and ``gradient`` is a tuple; forward arguments are passed unchanged, per-sample tensors row by row.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> e = ex.explain(torch.randn(2, 3, 64, 64), smooth=4, noise=0.15, generator=torch.Generator().manual_seed(0))
>>> tuple(e.gradient.shape), tuple(e.cams["layercam"].shape), e.smoothing["copies"]
((2, 3, 64, 64), (2, 64, 64), 4)
>>> ex.explain(torch.randn(2, 3, 64, 64), smooth=4, smooth_type="vargrad", noise_absolute=0.5).smoothing
{'copies': 4, 'type': 'vargrad', 'noise': None, 'noise_absolute': 0.5, 'chunk': 2}
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..capture.base import Capture
from ..core import cam as cam_maths
from ..core.inputs import Inputs, input_tensors
from ..core.maps import Explanation, LayerMaps, detach_tree
from ..core.targets import Score, explained_logits
from .assemble import explanation_of


#: How the copies' maps are combined (Captum NoiseTunnel's ``nt_type``): their mean, the mean of their squares, or
#: their variance (the mean of the squares minus the square of the mean, as Captum computes it).
SMOOTH_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _noise_level(name: str, value: Any, meaning: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                              not math.isfinite(value) or value < 0):
        raise ValueError(f"{name}= is the noise's standard deviation {meaning}, a finite number >= 0; got {value!r}")


def check(smooth: Any, noise: Any, generator: Any, chunk: Any, x: Tensor, smooth_type: Any = None,
          noise_absolute: Any = None) -> None:
    """Refuse smoothing settings that would be ignored or meaningless."""
    if smooth is None:
        given = [name for name, value in (("noise", noise), ("generator", generator), ("chunk", chunk),
                                          ("smooth_type", smooth_type), ("noise_absolute", noise_absolute))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}= only apply with smooth=N (the number of noisy copies per input)")
        return
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth= is the number of noisy copies per input, an int >= 1; got {smooth!r}")
    _noise_level("noise", noise, "as a fraction of each input's value range (e.g. 0.15)")
    _noise_level("noise_absolute", noise_absolute, "in the input's own units (Captum's stdevs)")
    if noise is not None and noise_absolute is not None:
        raise ValueError("give noise= (a fraction of each input's value range) or noise_absolute= (one standard "
                         "deviation in the input's units, Captum's stdevs), not both")
    if smooth_type is not None and not isinstance(smooth_type, str):
        raise TypeError(f"smooth_type= is one of {SMOOTH_TYPES}, got a {type(smooth_type).__name__}")
    if smooth_type is not None and smooth_type not in SMOOTH_TYPES:
        raise ValueError(f"smooth_type={smooth_type!r} is not one of {SMOOTH_TYPES}")
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
                   generator: Optional[torch.Generator], chunk: Optional[int], interpolate: str,
                   smooth_type: Optional[str] = None, noise_absolute: Optional[float] = None) -> Explanation:
    """The explanation of ``copies`` noisy copies of each input, combined by ``smooth_type`` (see the module
    docstring). ``x`` is what the capture takes; the noise is added to it as one (B, C, ...) tensor
    (:meth:`Capture.stack`)."""
    smooth_type = smooth_type or "smoothgrad"
    if noise_absolute is None:
        noise = DEFAULT_NOISE if noise is None else float(noise)
    clean = input_tensors(x) if isinstance(x, Inputs) else [capture.stack(x)]
    batch = clean[0].shape[0]
    chunk = chunk or batch
    with torch.no_grad():
        outputs = capture(x)
    logits = explained_logits(outputs, capture.output, batch).detach()
    classes, score_of_rows = score.for_copies(outputs, batch)  # class targets: resolved once, on the clean input
    sigmas = [_sigma(t, noise, noise_absolute) for t in clean]
    sums: Dict[str, Any] = {}
    names = cam_maths.cam_methods()
    squares = smooth_type != "smoothgrad"
    sizes: Dict[str, Tuple[int, ...]] = {}
    for start in range(0, batch * copies, chunk):
        rows = torch.arange(start, min(start + chunk, batch * copies), device=clean[0].device) // copies
        noisy = _noisy_copies(clean, sigmas, rows, generator)
        call = Inputs(tuple(noisy), x.rows(rows).extra) if isinstance(x, Inputs) else capture.unstack(noisy[0], like=x)
        result = capture.run(call, score_of_rows(rows))
        part = explanation_of(capture, result, noisy[0].shape[2:], interpolate,
                              [tuple(t.shape[2:]) for t in noisy] if isinstance(x, Inputs) else None)
        _accumulate(sums, part, rows, batch, names, squares)
        sizes.update((layer, maps.input_size) for layer, maps in part.layers.items())
    settings = {"copies": copies, "type": smooth_type, "noise": noise,
                "noise_absolute": None if noise_absolute is None else float(noise_absolute), "chunk": chunk}
    gradient = tuple(_statistic(sums, f"gradient/{i}", copies, smooth_type) for i in range(len(clean)))
    return _mean_explanation(capture, sums, copies, logits, classes, outputs, gradient if isinstance(x, Inputs)
                             else gradient[0], sizes, interpolate, settings)


def _sigma(clean: Tensor, noise: Optional[float], noise_absolute: Optional[float]) -> Tensor:
    """The noise's standard deviation per sample: ``noise`` times its value range, or ``noise_absolute``."""
    if noise_absolute is None:
        flat = clean.reshape(clean.shape[0], -1)
        return noise * (flat.amax(dim=1) - flat.amin(dim=1))
    return torch.full((clean.shape[0],), float(noise_absolute), dtype=clean.dtype, device=clean.device)


def _noisy_copies(clean: Sequence[Tensor], sigmas: Sequence[Tensor], rows: Tensor,
                  generator: Optional[torch.Generator]) -> List[Tensor]:
    """One noisy copy of each input per entry of ``rows``, the noise drawn copy by copy (each input in turn)."""
    eps = [[] for _ in clean]
    for _ in range(rows.numel()):
        for drawn, tensor in zip(eps, clean):
            drawn.append(torch.randn(tensor.shape[1:], generator=generator, dtype=tensor.dtype, device=tensor.device))
    return [tensor[rows] + sigma[rows].view(-1, *([1] * (tensor.dim() - 1))) * torch.stack(drawn)
            for tensor, sigma, drawn in zip(clean, sigmas, eps)]


def _add(sums: Dict[str, Any], key: str, rows: Tensor, value: Tensor, batch: int, squares: bool = False) -> None:
    value = cam_maths.working(value.detach())  # half-precision copies are summed in float32
    for name, term in ((key, value), (key + "^2", value * value))[:2 if squares else 1]:
        if name not in sums:
            sums[name] = torch.zeros((batch,) + tuple(term.shape[1:]), dtype=term.dtype, device=term.device)
        sums[name].index_add_(0, rows, term)


def _accumulate(sums: Dict[str, Any], part: Explanation, rows: Tensor, batch: int, names, squares: bool) -> None:
    for index, gradient in enumerate(part.gradients):
        _add(sums, f"gradient/{index}", rows, gradient, batch, squares)
    _add(sums, "score", rows, part.score, batch)
    for layer, maps in part.layers.items():
        _add(sums, f"{layer}/activation", rows, maps.activation, batch)
        _add(sums, f"{layer}/grad", rows, maps.grad, batch)
        if maps.layout.kind == "unknown":
            continue  # no CAM; asking for one raises the layout's error
        for name in names:
            _add(sums, f"{layer}/cam/{name}", rows, maps.cams_raw[name], batch, squares)


def _statistic(sums: Dict[str, Any], key: str, copies: int, smooth_type: str) -> Tensor:
    """Captum's: the mean, the mean of the squares, or the mean of the squares minus the squared mean."""
    mean = sums[key] / copies
    if smooth_type == "smoothgrad":
        return mean
    mean_of_squares = sums[key + "^2"] / copies
    return mean_of_squares if smooth_type == "smoothgrad_sq" else mean_of_squares - mean * mean


def _mean_explanation(capture: Capture, sums, copies, logits, classes, outputs, gradient, sizes, interpolate,
                      settings) -> Explanation:
    layouts = capture.layouts
    layers = {}
    kind = settings["type"]
    for layer in capture.layers:
        prefix = f"{layer}/cam/"
        cams = {key[len(prefix):]: _statistic(sums, key, copies, kind) for key in sums
                if key.startswith(prefix) and not key.endswith("^2")}
        maps = LayerMaps(sums[f"{layer}/activation"] / copies, sums[f"{layer}/grad"] / copies, sizes[layer],
                         interpolate, name=layer, fixed_cams=cams if cams else None)
        if layer in layouts:
            maps.layout = layouts[layer]
        layers[layer] = maps
    return Explanation(logits, classes, sums["score"] / copies, gradient, layers,
                       detach_tree(outputs), capture.rule.name, len(capture.swapped), smoothing=settings)
