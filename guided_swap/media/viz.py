"""Pictures of maps: pure functions on arrays and tensors, and one figure per batch with a colour bar per map.

Nothing here touches matplotlib's global state: :func:`figure` builds a ``matplotlib.figure.Figure`` (no
pyplot, no backend switch), so it is safe in notebooks, servers and threads. :func:`picture` composes the same
figure with numpy and Pillow (no matplotlib figure), many times faster: what the folder runner draws.

>>> import numpy as np
>>> m = np.array([[0.0, 1.0], [2.0, 3.0]])
>>> minmax(m).tolist()
[[0.0, 0.3333333333333333], [0.6666666666666666, 1.0]]
>>> standardize_clip(m).round(3).tolist()
[[0.366, 0.455], [0.545, 0.634]]
>>> standardize_clip(m * 1e-12).round(3).tolist()   # scale-free: a map of 1e-12 looks like the same map of 1
[[0.366, 0.455], [0.545, 0.634]]
"""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from skimage import io as skio

from .._files import atomic_write
from . import render
from ..core.cam import cam_methods
from .labels import IMAGENET_MEAN, IMAGENET_STD

PANELS = ("input", "gradient", "cam", "guided_gradcam")
MAP_PANELS = PANELS[1:]
TITLE_WIDTH = 28  # characters a panel title holds on one line at the figure's size
CAM_PANEL = "cams."  # "cams.NAME": any registered CAM (guided_swap.cam_methods()) at input size
# The classic name of each built-in CAM (a CAM the user registered is titled by its registered name).
CAM_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
              "hirescam": "HiResCAM", "elementwise": "element-wise Grad-CAM", "eigengradcam": "EigenGrad-CAM",
              "eigencam": "Eigen-CAM", "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM", "fullgrad": "FullGrad"}
SCALES = ("shared", "per-image")
# A map whose spread is below this fraction of its largest magnitude is float32 rounding noise around a
# constant (float32 resolves about 6e-8 relative): it is drawn flat. Relative, so tiny maps still show.
RELATIVE_FLOOR = 1e-6
SATURATION, BRIGHTNESS = 0.1, 0.5

Limits = Tuple[float, float]


def to_numpy(a) -> np.ndarray:
    """A tensor (any device, with or without grad) or array as a float64 numpy array."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def standardize_limits(m, saturation: float = SATURATION, brightness: float = BRIGHTNESS) -> Limits:
    """The values that :func:`standardize_clip` draws as 0 and as 1: ``mean - brightness/saturation * std``
    and ``mean + (1 - brightness)/saturation * std``, with ``std`` floored at ``RELATIVE_FLOOR * max|m|``.

    >>> standardize_limits([0.0, 2.0])
    (-4.0, 6.0)
    """
    m = to_numpy(m)
    return _standard_limits(float(m.mean()), float(m.std()), float(np.abs(m).max(initial=0.0)), saturation, brightness)


def _standard_limits(mean: float, std: float, largest: float, saturation: float, brightness: float) -> Limits:
    spread = max(std, RELATIVE_FLOOR * largest)
    if spread == 0.0:  # all zeros: any range centred on 0 draws it at ``brightness``
        spread = saturation
    return mean - brightness / saturation * spread, mean + (1.0 - brightness) / saturation * spread


def scale_to_unit(m, limits: Limits) -> np.ndarray:
    """``clip((m - lo) / (hi - lo), 0, 1)`` for ``limits = (lo, hi)``."""
    low, high = _check_limits("limits", limits)
    return np.clip((to_numpy(m) - low) / (high - low), 0.0, 1.0)


def standardize_clip(m, saturation: float = SATURATION, brightness: float = BRIGHTNESS) -> np.ndarray:
    """``clip((m - mean) / max(std, RELATIVE_FLOOR * max|m|) * saturation + brightness, 0, 1)``.

    The floor is relative to the map's own magnitude, so a Guided Grad-CAM of a GELU net (values near 1e-12)
    is drawn like any other map, while a constant map is drawn flat at ``brightness``.
    """
    return scale_to_unit(m, standardize_limits(m, saturation, brightness))


def minmax(m) -> np.ndarray:
    """Scale to [0, 1]; a constant map (spread under ``RELATIVE_FLOOR`` of its magnitude) becomes zeros."""
    m = to_numpy(m)
    low, high = (float(m.min()), float(m.max())) if m.size else (0.0, 0.0)
    if high - low <= RELATIVE_FLOOR * max(abs(low), abs(high)):
        return np.zeros_like(m)
    return (m - low) / (high - low)


def grayscale(gradient, absolute: bool = False) -> np.ndarray:
    """Max over colour channels of a (C, H, W) map (of its absolute value for plain gradients): (H, W)."""
    g = to_numpy(gradient)
    if g.ndim != 3:
        raise ValueError(f"expected a (C, H, W) map, got shape {g.shape}")
    return (np.abs(g) if absolute else g).max(axis=0)


def to_rgb(m, limits: Optional[Limits] = None) -> np.ndarray:
    """A (C, H, W) map as an (H, W, 3) picture (grey for one channel): each channel scaled by ``limits``
    (default: :func:`standardize_limits` of the map itself) and clipped."""
    g = scale_to_unit(m, standardize_limits(m) if limits is None else limits)
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
    return _colormap(cmap)(np.clip(to_numpy(heat), 0.0, 1.0))[..., :3]


def _colormap(cmap):
    if isinstance(cmap, str):
        if cmap not in colormaps:
            raise ValueError(f"unknown colour map {cmap!r}; try 'jet', 'viridis', 'inferno' or 'turbo'")
        return colormaps[cmap]
    return cmap


def overlay(image, heat, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped (H, W) map in [0, 1] over an (H, W, 3) picture in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = to_numpy(image)
    if image.shape[:2] != to_numpy(heat).shape:
        raise ValueError(f"image {image.shape[:2]} and map {to_numpy(heat).shape} differ in size")
    return np.clip((1 - alpha) * image + alpha * colormap(heat, cmap), 0.0, 1.0)


# --- colour ranges ----------------------------------------------------------------------------------------

class _Moments:
    """Streaming count, sum, sum of squares and extremes of many arrays (float64)."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0
        self.low, self.high = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        self.count += values.size
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    def limits(self, panel: str) -> Limits:
        if _is_cam(panel):  # CAMs are >= 0: zero evidence is always the bottom of the scale
            low = min(0.0, self.low)
            return (low, self.high) if self.high > low else (low, low + 1.0)
        mean = self.total / self.count
        std = max(self.squares / self.count - mean * mean, 0.0) ** 0.5
        return _standard_limits(mean, std, max(abs(self.low), abs(self.high)), SATURATION, BRIGHTNESS)


def _is_cam(panel: str) -> bool:
    """Whether a panel is a one-channel class activation map (drawn over the input, scaled from 0)."""
    return panel == "cam" or panel.startswith(CAM_PANEL)


def _panel_values(source, panel: str):
    """The (B, ...) array of ``panel`` in an Explanation or a mapping (e.g. a loaded .npz); None if absent."""
    if isinstance(source, Mapping):
        return source.get(panel)
    if panel != "gradient" and not getattr(source, "layers", None):
        return None
    if panel.startswith(CAM_PANEL):
        return source.cams[panel[len(CAM_PANEL):]]
    return getattr(source, panel)


def shared_limits(sources: Iterable, panels: Sequence[str] = MAP_PANELS) -> Dict[str, Limits]:
    """One colour range per map panel over every map in ``sources``: Explanations, or mappings of panel name to
    array such as loaded ``.npz`` files (so a whole folder can share one scale, read one file at a time).

    ``gradient`` and ``guided_gradcam`` get the standardised range (mean ± 5 std over all their values);
    ``cam`` and every ``cams.NAME`` get ``(0, max)``. Panels no source has are left out.

    >>> import numpy as np
    >>> shared_limits([{"cam": np.array([[1.0, 2.0]])}, {"cam": np.array([[4.0]])}])
    {'cam': (0.0, 4.0)}
    """
    _check_panels(panels, allowed=MAP_PANELS)
    moments = {panel: _Moments() for panel in panels}
    for source in sources:
        for panel in panels:
            values = _panel_values(source, panel)
            if values is not None and to_numpy(values).size:
                moments[panel].add(to_numpy(values))
    return {panel: m.limits(panel) for panel, m in moments.items() if m.count}


def _check_limits(name: str, limits) -> Limits:
    try:
        low, high = (float(v) for v in limits)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: limits must be a pair (low, high) of numbers, got {limits!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise ValueError(f"{name}: limits must be finite with low < high, got ({low}, {high})")
    return low, high


def _check_panels(panels: Sequence[str], allowed: Sequence[str] = PANELS) -> None:
    if isinstance(panels, str):
        raise TypeError(f"panels must be a sequence of names such as ('input', 'cam'), got the string {panels!r}")
    cams = cam_methods()
    unknown = [p for p in panels if p not in allowed and not (p.startswith(CAM_PANEL) and p[len(CAM_PANEL):] in cams)]
    if unknown:
        raise ValueError(f"unknown panel(s) {unknown}; choose from {list(allowed)}, or 'cams.NAME' for a CAM NAME "
                         f"of {list(cams)}")


# --- titles -----------------------------------------------------------------------------------------------

_RULE_TITLES = {"guided": "guided backprop", "deconvnet": "deconvnet", "gradient": "plain gradient"}


def gradient_title(rule: str, swapped: Optional[int]) -> str:
    """What the input gradient is: by the rule, and "plain gradient (no ReLU swapped)" when nothing was swapped.

    With ``swapped=None`` (unknown) the title names the rule only, claiming nothing about its effect.

    >>> gradient_title("guided", 12), gradient_title("guided", 0), gradient_title("guided", None)
    ('guided backprop', 'plain gradient (no ReLU swapped)', "'guided' rule")
    """
    if rule == "gradient":
        return "plain gradient"
    if swapped == 0:
        return "plain gradient (no ReLU swapped)"
    if swapped is None:
        return f"{rule!r} rule"
    return _RULE_TITLES.get(rule, f"{rule!r} rule")


def cam_title(name: str, layer: Optional[str] = None) -> str:
    """What the CAM registered as ``name`` is called, with its layer.

    >>> cam_title("gradcam++", "layer4"), cam_title("hirescam"), cam_title("my-cam", "layer4")
    ('Grad-CAM++ (layer4)', 'HiResCAM', 'my-cam (layer4)')
    >>> cam_title("layercam", "blocks.1.norm1.layer_norm")  # a long name goes on a line of its own
    'LayerCAM\\n(blocks.1.norm1.layer_norm)'
    """
    title = CAM_TITLES.get(name, name)
    if not layer:
        return title
    return f"{title} ({layer})" if len(title) + len(layer) <= TITLE_WIDTH else f"{title}\n({layer})"


def smoothing_note(smoothing: Optional[Mapping]) -> str:
    """The line a smoothed map's title gets: how many noisy copies were averaged, and the noise.

    >>> smoothing_note({"copies": 16, "noise": 0.15, "chunk": 8}), smoothing_note(None)
    ('\\nSmoothGrad: 16 copies, noise 0.15', '')
    >>> smoothing_note({"copies": 8, "type": "vargrad", "noise": None, "noise_absolute": 0.3})
    '\\nVarGrad: 8 copies, noise σ 0.3'
    """
    if not smoothing:
        return ""
    kind = _SMOOTHING_NAMES.get(smoothing.get("type") or "smoothgrad", str(smoothing.get("type")))
    noise = f"noise {smoothing['noise']:g}" if smoothing.get("noise") is not None else \
        f"noise σ {smoothing['noise_absolute']:g}"
    return f"\n{kind}: {smoothing['copies']} copies, {noise}"


_SMOOTHING_NAMES = {"smoothgrad": "SmoothGrad", "smoothgrad_sq": "SmoothGrad²", "vargrad": "VarGrad"}


def _titles(explanation, swapped: Optional[int], layer_nodes: Mapping[str, str], panels: Sequence[str]) \
        -> Dict[str, str]:
    gradient = gradient_title(getattr(explanation, "rule", "guided"), swapped)
    layer = next(iter(explanation.layers), None) if getattr(explanation, "layers", None) else None
    if layer == "auto":  # the node "auto" chose says something; "auto" itself does not
        layer = layer_nodes.get(layer)
    guided_gradcam = "Guided Grad-CAM" if gradient == "guided backprop" else f"Grad-CAM ×\n{gradient}"
    titles = {"gradient": gradient, "cam": cam_title("gradcam", layer), "guided_gradcam": guided_gradcam}
    titles.update({p: cam_title(p[len(CAM_PANEL):], layer) for p in panels if p.startswith(CAM_PANEL)})
    note = smoothing_note(getattr(explanation, "smoothing", None))
    return {panel: title + note for panel, title in titles.items()}


def _swap_count(explanation, explainer, swapped) -> Optional[int]:
    """How many rectifiers were swapped: ``swapped``, else the explainer's, else the explanation's, else None."""
    if swapped is None and explainer is not None:
        swapped = explainer.swapped
    if swapped is None:
        swapped = getattr(explanation, "swapped", None)
    if swapped is None or isinstance(swapped, (int, np.integer)):
        return None if swapped is None else int(swapped)
    return len(swapped)


def _row_title(explanation, probabilities, labels, i: int) -> str:
    target = explanation.target
    if target is None:
        return f"score {float(explanation.score[i]):.3g}"
    target = int(target[i])
    if labels is not None:
        if not 0 <= target < len(labels):
            raise ValueError(f"target class {target} has no name: labels has {len(labels)} entries")
        name = printable(labels[target])
    else:
        name = f"class {target}"
    if probabilities is None:
        return f"{name}: score {float(explanation.score[i]):.3g}"
    return f"{name}: p={float(probabilities[i, target]):.2f}"


def _probabilities(explanation, probabilities):
    """Softmax of the logits when they are class logits (B, K>1); otherwise None (the row shows the score)."""
    if probabilities is not None:
        return to_numpy(probabilities)
    logits = getattr(explanation, "logits", None)
    if logits is None or logits.dim() != 2 or logits.shape[1] < 2:
        return None
    return torch.softmax(logits.detach().float(), dim=1).cpu().numpy()


# --- the figure -------------------------------------------------------------------------------------------

def available_panels(explanation) -> Tuple[str, ...]:
    """The default panels of this explanation: input and gradient always, Grad-CAM and Guided Grad-CAM when a
    layer was captured (with a layer, any ``"cams.NAME"`` panel can be asked for too)."""
    return PANELS if getattr(explanation, "layers", None) else PANELS[:2]


def _can_fill(explanation, panel: str) -> bool:
    return panel in PANELS[:2] or bool(getattr(explanation, "layers", None))


def figure(explanation, inputs, panels: Optional[Sequence[str]] = None, *, explainer=None,
           swapped: Optional[int] = None, labels: Optional[Sequence[str]] = None, probabilities=None,
           notes: Optional[Sequence[str]] = None, scale: str = "shared",
           limits: Optional[Mapping[str, Limits]] = None, cmap: str = "jet", alpha: float = 0.5,
           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """A ``matplotlib.figure.Figure``, one row per image, one column per panel, a colour bar on every map.

    ``panels``: any of ``"input"``, ``"gradient"``, ``"cam"``, ``"guided_gradcam"``, and ``"cams.NAME"`` for any
    CAM of ``guided_swap.cam_methods()`` (default: the first four, those the explanation has; asking for a CAM
    panel of an explanation without a captured layer is an error).

    Titles say what each map is. The gradient panel is named by the rule, and "plain gradient (no ReLU
    swapped)" when nothing was swapped: the count is ``swapped``, else ``explainer``'s, else the explanation's
    own (``e.swapped``); where none is known the title names only the rule.
    Each CAM panel is titled by the CAM's classic name (``"cams.gradcam++"``: Grad-CAM++, ``"cams.hirescam"``:
    HiResCAM, ...) and its layer (the node ``"auto"`` chose, given ``explainer``). A smoothed explanation's maps
    say so (SmoothGrad, the number of copies and the noise) in their titles. The input panel is
    titled with the class name (``labels[target]``, else "class N"), its probability (softmax of the logits, or
    ``probabilities``) and ``notes[i]``.

    ``scale="shared"`` (the default) gives each map panel one colour range over all rows, so rows can be
    compared: a map twice as strong looks twice as strong. ``"per-image"`` stretches every map to its own range,
    which shows each map's shape but hides how strong it is. ``limits={"cam": (lo, hi), ...}`` fixes a panel's
    range (e.g. one shared over a whole folder, from :func:`shared_limits`). Gradient maps are drawn in colour,
    each channel scaled by the range (the bar shows it in grey); Grad-CAM through ``cmap``, blended at ``alpha``.

    >>> import torch, guided_swap as gs
    >>> gelu_net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
    ...                                torch.nn.Flatten()).eval()
    >>> ex = gs.convert(gelu_net, layer="0")
    >>> x = torch.randn(2, 3, 16, 16)
    >>> fig = figure(ex.explain(x), x, explainer=ex)
    >>> [ax.get_title() for ax in fig.axes[1:4]]
    ['plain gradient (no ReLU swapped)', 'Grad-CAM (0)', 'Grad-CAM ×\\nplain gradient (no ReLU swapped)']
    """
    rows = plan(explanation, inputs, panels, explainer=explainer, swapped=swapped, labels=labels,
                probabilities=probabilities, notes=notes, scale=scale, limits=limits, mean=mean, std=std)
    fig = Figure(figsize=(2.9 * len(rows[0][1]), 2.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(rows[0][1]), squeeze=False)
    for row_axes, (image, cells) in zip(axes, rows):
        for ax, cell in zip(row_axes, cells):
            ax.set_xticks([])
            ax.set_yticks([])
            if cell.values is None:
                ax.imshow(image)
            else:
                draw_map(fig, ax, cell.panel, cell.values, image, cell.limits, cmap, alpha)
            ax.set_title(cell.title, fontsize=9, **PLAIN)
    return fig


def picture(explanation, inputs, panels: Optional[Sequence[str]] = None, *, explainer=None,
            swapped: Optional[int] = None, labels: Optional[Sequence[str]] = None, probabilities=None,
            notes: Optional[Sequence[str]] = None, scale: str = "shared",
            limits: Optional[Mapping[str, Limits]] = None, cmap: str = "jet", alpha: float = 0.5,
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> render.Picture:
    """:func:`figure`'s picture composed with numpy and Pillow, about twenty times faster: the same panels, titles,
    ranges and colours, a colour bar on every map (arguments as :func:`figure`'s). What the folder runner draws.

    A :class:`guided_swap.media.render.Picture`: ``.image`` is a Pillow image, ``.titles`` the titles row by
    row, and ``.savefig(path)`` (or :func:`save_png`) writes a PNG. Panels are drawn at the input's own size
    (enlarged by whole pixels under 160 pixels, reduced by a whole factor over 448), not resampled.

    >>> import torch, guided_swap as gs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten()).eval()
    >>> ex = gs.convert(net, layer="0")
    >>> x = torch.randn(1, 3, 16, 16)
    >>> p = picture(ex.explain(x), x, explainer=ex, notes=["$x^$.png"])
    >>> p.titles[0][0].splitlines()[1], p.titles[0][1:]
    ('$x^$.png', ['guided backprop', 'Grad-CAM (0)', 'Guided Grad-CAM'])
    """
    rows = plan(explanation, inputs, panels, explainer=explainer, swapped=swapped, labels=labels,
                probabilities=probabilities, notes=notes, scale=scale, limits=limits, mean=mean, std=std)
    return render.compose([[_coloured(cell, image, cmap, alpha) for cell in cells] for image, cells in rows])


_BAR = np.linspace(0.0, 1.0, 256)


def _coloured(cell: "Cell", image: np.ndarray, cmap, alpha: float) -> render.Cell:
    """A planned cell as the picture :func:`draw_map` draws: a CAM over the input through ``cmap``, a gradient-like
    map in colour with a grey bar."""
    if cell.values is None:
        return render.Cell(image, cell.title)
    if _is_cam(cell.panel):
        shown = overlay(image, scale_to_unit(cell.values, cell.limits), alpha, cmap)
        return render.Cell(shown, cell.title, render.Bar(cell.limits, colormap(_BAR, cmap)))
    return render.Cell(to_rgb(cell.values, cell.limits), cell.title, render.Bar(cell.limits, colormap(_BAR, "gray")))


#: Text properties that draw a title as the characters it holds: no math text (``$...$``), no TeX.
PLAIN = {"parse_math": False, "usetex": False}


@dataclass(frozen=True)
class Cell:
    """One panel of one row: its name, its title, and the map it shows (None for the input) on ``limits``."""

    panel: str
    title: str
    values: Optional[np.ndarray] = None
    limits: Optional[Limits] = None


def plan(explanation, inputs, panels: Optional[Sequence[str]] = None, *, explainer=None,
         swapped: Optional[int] = None, labels: Optional[Sequence[str]] = None, probabilities=None,
         notes: Optional[Sequence[str]] = None, scale: str = "shared", limits: Optional[Mapping[str, Limits]] = None,
         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) \
        -> List[Tuple[np.ndarray, List[Cell]]]:
    """What a figure shows, whoever draws it (:func:`figure` with matplotlib, :func:`picture` with Pillow): per
    row, the input as an (H, W, 3) picture and one :class:`Cell` per panel, with its title and range (arguments
    as :func:`figure`'s).

    >>> from types import SimpleNamespace
    >>> e = SimpleNamespace(gradient=torch.ones(1, 3, 2, 2), logits=torch.zeros(1, 2), target=torch.ones(1).long(),
    ...                     score=torch.zeros(1), layers={}, swapped=4, rule="guided")
    >>> picture, cells = plan(e, torch.zeros(1, 3, 2, 2), notes=["$x^$.png"])[0]
    >>> [(c.panel, c.title) for c in cells]
    [('input', 'class 1: p=0.50\\n$x^$.png'), ('gradient', 'guided backprop')]
    """
    panels = tuple(available_panels(explanation) if panels is None else panels)
    _check_figure_arguments(explanation, inputs, panels, notes, scale, limits)
    ranges = _ranges(explanation, panels, scale, limits)
    report = getattr(explainer, "report", None)
    titles = _titles(explanation, _swap_count(explanation, explainer, swapped), getattr(report, "layers", {}), panels)
    probabilities = _probabilities(explanation, probabilities)
    rows = []
    for i in range(inputs.shape[0]):
        heading = _row_title(explanation, probabilities, labels, i) + \
            (f"\n{printable(notes[i])}" if notes is not None else "")
        cells = [Cell(panel, heading) if panel == "input" else _map_cell(explanation, i, panel, titles[panel],
                                                                         ranges[panel]) for panel in panels]
        rows.append((denormalize(inputs[i], mean, std), cells))
    return rows


def _map_cell(explanation, i: int, panel: str, title: str, limit: Optional[Limits]) -> Cell:
    if limit is None:  # per image: the range of this row's map alone
        limit = shared_limits([_row(explanation, i, panel)], [panel])[panel]
    values = to_numpy(_panel_values(explanation, panel)[i])
    return Cell(panel, title + ("" if values.any() else ZERO_NOTE), values, limit)


def printable(text) -> str:
    """``text`` as the characters a title shows, one for one: bytes that are not UTF-8 (a file name read with
    ``surrogateescape``, as ``os.listdir`` gives them) as ``\\xNN``, control characters (a newline, a tab) as
    their escapes. Nothing is interpreted: ``$`` is a dollar sign.

    >>> import os
    >>> printable(os.fsdecode(b"bad\\xff.png")), printable("two\\nlines.png"), printable("$\\\\alpha$.png")
    ('bad\\\\xff.png', 'two\\\\nlines.png', '$\\\\alpha$.png')
    """
    text = str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


#: Added to the title of a panel whose map is zero everywhere: it shows nothing, though coloured like an answer.
ZERO_NOTE = "\n(zero everywhere)"


def _row(explanation, i: int, panel: str) -> Dict[str, np.ndarray]:
    return {panel: _panel_values(explanation, panel)[i:i + 1]}


def _ranges(explanation, panels, scale: str, limits) -> Dict[str, Optional[Limits]]:
    """Each map panel's fixed range: from ``limits``, else over all rows (shared), else None (per image)."""
    maps = [p for p in panels if p != "input"]
    fixed = {p: _check_limits(f"limits[{p!r}]", limits[p]) for p in maps if limits and p in limits}
    if scale == "shared":
        fixed.update({p: r for p, r in shared_limits([explanation], [p for p in maps if p not in fixed]).items()})
    return {p: fixed.get(p) for p in maps}


def draw_map(fig, ax, panel: str, values, picture: np.ndarray, limit: Limits, cmap="jet", alpha: float = 0.5) -> None:
    """Draw one map on ``ax`` of ``fig`` with its colour bar: a CAM (H, W) as an overlay on ``picture``
    through ``cmap``, a gradient-like (C, H, W) map in colour; both scaled by ``limit = (lo, hi)``."""
    if _is_cam(panel):
        ax.imshow(overlay(picture, scale_to_unit(values, limit), alpha, cmap))
        bar_cmap = _colormap(cmap)
    else:
        ax.imshow(to_rgb(values, limit))
        bar_cmap = "gray"
    bar = fig.colorbar(ScalarMappable(Normalize(*limit), bar_cmap), ax=ax, fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    bar.formatter.set_powerlimits((-2, 3))
    bar.ax.yaxis.get_offset_text().set_fontsize(6)


def _check_figure_arguments(explanation, inputs, panels, notes, scale, limits) -> None:
    if isinstance(getattr(explanation, "gradient", None), tuple) or isinstance(inputs, tuple):
        raise ValueError("a figure draws one input per row; this explanation has several inputs: draw each with "
                         "figure(e.of_input(i), x_i)")
    _check_panels(panels)
    if not panels:
        raise ValueError("panels is empty: name at least one of " + ", ".join(PANELS))
    missing = [p for p in panels if not _can_fill(explanation, p)]
    if missing:
        raise ValueError(f"panel(s) {missing} need a captured layer, and this explanation has none: "
                         "convert with layer=NAME (or 'auto'), or leave those panels out")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if limits is not None:
        _check_panels(list(limits), allowed=MAP_PANELS)
    rows = explanation.gradient.shape[0]
    if inputs.shape[0] != rows:
        raise ValueError(f"inputs has {inputs.shape[0]} images but the explanation {rows}")
    if notes is not None and len(notes) != rows:
        raise ValueError(f"notes has {len(notes)} entries for {rows} images")


def save_png(fig_or_array, path: str, dpi: int = 110) -> str:
    """Write a figure or an (H, W[, 3]) array in [0, 1] to a PNG, atomically (no half-written file is visible)."""
    with atomic_write(path, suffix=".png") as temporary:
        if hasattr(fig_or_array, "savefig"):
            fig_or_array.savefig(temporary, dpi=dpi, format="png")
        else:
            skio.imsave(temporary, (np.clip(to_numpy(fig_or_array), 0, 1) * 255).astype(np.uint8), check_contrast=False)
    return path
