"""The one path from a forward/backward pass to maps: :class:`LayerMaps` per layer, :class:`Explanation` overall.

``Explainer.explain``, the exported program and the command line all build their maps here, through
:func:`explanation_from_pass`; slicing a sample out (``e[i]``) and flattening to arrays (``e.to_dict()``) live
here too.

>>> import torch
>>> A = torch.rand(2, 4, 3, 3); G = torch.randn(2, 4, 3, 3)
>>> e = Explanation(logits=torch.randn(2, 10), target=torch.tensor([1, 2]), score=torch.zeros(2),
...                 gradient=torch.randn(2, 3, 12, 12), layers={"layer4": LayerMaps(A, G, (12, 12))})
>>> len(e), tuple(e[1].cam.shape), sorted(e.to_dict())
(2, (1, 12, 12), ['cam', 'cam_raw', 'gradient', 'guided_gradcam', 'logits', 'score', 'target'])
>>> tuple(e.cams["gradcam++"].shape), tuple(e.layers["layer4"].cams_raw["eigengradcam"].shape)
((2, 12, 12), (2, 3, 3))
"""
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import cam as cam_maths
from . import cam_options
from .errors import LayerError
from .layout import CHANNELS_FIRST, VECTOR, Layout


class PassResult(NamedTuple):
    """What one forward and one backward of an explainer give; every map is made from these."""

    outputs: Any                   # the model's output, as the model returns it
    captures: Tuple[Tensor, ...]   # the activation A at each captured layer
    score: Tensor                  # (B,) the explained score
    classes: Optional[Tensor]      # (B,) the class per sample, for class targets
    input_grad: Any                # d score / d x under the explainer's rule (a tuple for several inputs)
    layer_grads: Tuple[Tensor, ...]  # the ordinary gradient G at each captured layer


class CamMaps(Mapping):
    """Every registered CAM (``guided_swap.cam_methods()``) of one layer by name, each computed on first access.

    ``fixed`` holds maps computed ahead (a smoothed explanation's means over the noisy copies): only those
    names are available then. ``extra`` names the maps that passes of their own made (``explain(x,
    cams=("scorecam", ...))``), available beside the registered ones.
    """

    def __init__(self, make: Callable[[str], Tensor], fixed: Optional[Dict[str, Tensor]] = None,
                 extra: Optional[Mapping] = None):
        self._make, self._fixed, self._cache = make, fixed, {}
        self._extra = {} if extra is None else extra  # maps made by passes of their own (Score-CAM, ...)

    def __getitem__(self, name: str) -> Tensor:
        if name in self._extra:
            return self._make(name)
        if self._fixed is not None:
            if name not in self._fixed:
                raise cam_maths.CamError(f"{name!r} is not among the CAMs of this smoothed explanation "
                                         f"{tuple(self._fixed)}: smoothing computes the CAMs registered when "
                                         "explain() is called")
            return self._make(name)
        function = cam_maths.get_cam(name)  # re-registering a name under replace=True computes it afresh
        if (name, function) not in self._cache:
            self._cache[(name, function)] = self._make(name)
        return self._cache[(name, function)]

    def provide(self, name: str, value: Tensor) -> None:
        """Take ``value`` as the map ``name`` (computed elsewhere, e.g. inside a compiled pass) instead of making
        it on first access; it stands for the CAM registered under ``name`` now, as a computed one would."""
        if self._fixed is not None:
            raise cam_maths.CamError("a smoothed explanation's CAMs are fixed means; nothing can be provided")
        self._cache[(name, cam_maths.get_cam(name))] = value

    def __iter__(self) -> Iterator[str]:
        names = tuple(self._fixed) if self._fixed is not None else cam_maths.cam_methods()
        return iter(names + tuple(name for name in self._extra if name not in names))

    def __len__(self) -> int:
        return len(tuple(iter(self)))

    def __contains__(self, name: object) -> bool:
        return name in tuple(iter(self))

    def __repr__(self) -> str:
        return f"CamMaps({list(iter(self))})"


@dataclass
class LayerMaps:
    """The activation ``A`` and ordinary gradient ``G`` captured at one layer, and the maps made from them.

    ``activation`` and ``grad`` are the captured tensors as the model holds them; ``layout`` says how they
    become the (B, C, *spatial) ``feature_map`` and ``feature_grad`` that every CAM is computed from (a token
    (B, N, C) or channels-last capture is reshaped, a CNN's is taken as it is). ``cams_raw[name]`` is any
    registered CAM at the layer's resolution, ``cams[name]`` resized to the input; ``cam_raw``/``cam`` are
    Grad-CAM, ``pixelwise_cam`` HiResCAM and ``guided_pixelwise_cam`` LayerCAM.
    """

    activation: Tensor
    grad: Tensor
    input_size: Tuple[int, ...]
    interpolate: str = "bilinear"
    layout: Layout = CHANNELS_FIRST
    name: str = ""
    fixed_cams: Optional[Dict[str, Tensor]] = field(default=None, repr=False)  # precomputed raw maps (smoothing)
    pass_cams: Dict[str, Tensor] = field(default_factory=dict, repr=False)  # raw maps made by passes of their own
    pass_weights: Dict[str, Tensor] = field(default_factory=dict, repr=False)  # their channel weights (B, K), if any

    @cached_property
    def _feature(self) -> Tuple[Tensor, Tensor]:
        layout = VECTOR if self.layout.kind == "nchw" and self.activation.dim() == 2 else self.layout  # (B, C)
        return (layout.to_channels_first(self.activation, self.input_size, self.name),
                layout.to_channels_first(self.grad, self.input_size, self.name))

    @property
    def feature_map(self) -> Tensor:
        """``A`` as (B, C, *spatial): what the CAMs are computed from."""
        return self._feature[0]

    @property
    def feature_grad(self) -> Tensor:
        """``G`` as (B, C, *spatial)."""
        return self._feature[1]

    def _raw(self, name: str) -> Tensor:
        if name in self.pass_cams:
            return self.pass_cams[name]
        if self.fixed_cams is not None:
            return self.fixed_cams[name]
        return cam_maths.compute(name, *self._feature)

    @cached_property
    def cams_raw(self) -> CamMaps:
        """Every registered CAM at the layer's resolution, (B, *layer spatial), by name."""
        return CamMaps(self._raw, self.fixed_cams, self.pass_cams)

    @cached_property
    def cams(self) -> CamMaps:
        """Every registered CAM resized to the input, (B, *input spatial), by name."""
        return CamMaps(lambda name: cam_maths.upsample(self.cams_raw[name], self.input_size, self.interpolate),
                       self.fixed_cams, self.pass_cams)

    @property
    def cam_raw(self) -> Tensor:
        """Grad-CAM at the layer's resolution."""
        return self.cams_raw["gradcam"]

    @property
    def cam(self) -> Tensor:
        """Grad-CAM resized to the input."""
        return self.cams["gradcam"]

    @property
    def pixelwise_cam_raw(self) -> Tensor:
        """Pixel-wise CAM (HiResCAM) at the layer's resolution."""
        return self.cams_raw["hirescam"]

    @property
    def guided_pixelwise_cam_raw(self) -> Tensor:
        """Guided pixel-wise CAM (LayerCAM) at the layer's resolution."""
        return self.cams_raw["layercam"]

    @property
    def pixelwise_cam(self) -> Tensor:
        """HiResCAM resized to the input."""
        return self.cams["hirescam"]

    @property
    def guided_pixelwise_cam(self) -> Tensor:
        """LayerCAM resized to the input."""
        return self.cams["layercam"]

    def cam_map(self, name: str = "gradcam", *, signed: bool = False, per_channel: bool = False,
                eigen_smooth: bool = False, resize: bool = False) -> Tensor:
        """The CAM ``name`` with options (:mod:`guided_swap.core.cam_options`): ``signed`` (no ReLU),
        ``per_channel`` (B, K, *spatial), ``eigen_smooth`` (the principal component instead of the channel sum);
        at the layer's resolution, or the input's with ``resize``. No option: ``cams_raw[name]`` (``cams[name]``).
        Score-CAM's and Ablation-CAM's weighted activations are ``w_k A_k`` with the weights their passes measured;
        FullGrad has none, and options on it raise :class:`~guided_swap.CamError`.

        >>> G = torch.tensor([1.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
        >>> maps = LayerMaps(torch.ones(1, 2, 2, 2), G, (4, 4))
        >>> maps.cam_map("gradcam", signed=True)[0, 0], tuple(maps.cam_map(per_channel=True, resize=True).shape)
        (tensor([-2., -2.]), (1, 2, 4, 4))
        """
        cam_options.check_flags(signed=signed, per_channel=per_channel, eigen_smooth=eigen_smooth, resize=resize)
        if not (signed or per_channel or eigen_smooth):
            return (self.cams if resize else self.cams_raw)[name]
        if self.fixed_cams is not None:
            raise cam_maths.CamError("a smoothed explanation holds a statistic of the copies' CAMs, not the copies' "
                                     "activations and gradients: signed=, per_channel= and eigen_smooth= cannot be "
                                     "computed from it; explain without smooth= for them")
        options = dict(signed=signed, per_channel=per_channel, eigen_smooth=eigen_smooth)
        if name in self.pass_weights:  # Score-CAM, Ablation-CAM: w_k A_k with the weights their passes measured
            out = cam_options.weights_map(name, self.feature_map, self.pass_weights[name], **options)
        else:
            out = cam_options.cam_map(name, *self._feature, **options)
        if not resize:
            return out
        if not per_channel:
            return cam_maths.upsample(out, self.input_size, self.interpolate)
        flat = cam_maths.upsample(out.flatten(0, 1), self.input_size, self.interpolate)
        return flat.view(out.shape[:2] + flat.shape[1:])

    def __getitem__(self, index: Union[int, slice]) -> "LayerMaps":
        rows = _rows(index)
        fixed = None if self.fixed_cams is None else {k: v[rows] for k, v in self.fixed_cams.items()}
        return replace(self, activation=self.activation[rows], grad=self.grad[rows], fixed_cams=fixed,
                       pass_cams={k: v[rows] for k, v in self.pass_cams.items()},
                       pass_weights={k: v[rows] for k, v in self.pass_weights.items()})


@dataclass
class Explanation:
    """Everything one ``explain`` call computed. Maps from CAMs are made on first access.

    ``gradient`` is the input gradient under the explainer's rule (guided backprop for ``"guided"``);
    ``cam_raw``, ``cam`` and ``guided_gradcam`` come from the first layer, ``layers[name]`` from any.
    ``e[i]`` is sample ``i`` as a batch of one, ``e[a:b]`` a sub-batch; ``e.to_dict()`` the maps by name.
    For a model explained with several inputs (``explain((x1, x2))``), ``gradient`` and ``guided_gradcam`` are
    tuples with one entry per input, and each layer's CAMs are resized to the first input it is computed from
    that has as many spatial dimensions as the map.
    """

    logits: Tensor
    target: Optional[Tensor]
    score: Tensor
    gradient: Any  # a tensor, or a tuple of tensors for several inputs
    layers: Dict[str, LayerMaps]
    outputs: Any = field(repr=False, default=None)
    rule: str = "guided"
    swapped: Optional[int] = None  # rectifier call sites that carry the rule (0: every map is a plain gradient)
    smoothing: Optional[Dict[str, Any]] = None  # SmoothGrad settings (copies, noise, chunk) when smoothed

    def _first(self) -> LayerMaps:
        if not self.layers:
            raise LayerError("this explainer captures no layer: convert with layer=NAME (or 'auto') for CAMs")
        return next(iter(self.layers.values()))

    @property
    def cam_raw(self) -> Tensor:
        """Grad-CAM at the layer's resolution, (B, *layer spatial)."""
        return self._first().cam_raw

    @property
    def cam(self) -> Tensor:
        """Grad-CAM resized to the input, (B, *input spatial)."""
        return self._first().cam

    @property
    def guided_gradcam(self) -> Any:
        """``cam * gradient`` per channel, the input's shape. For several inputs a tuple: each input's gradient
        times Grad-CAM resized to that input, None for an input with another number of spatial dimensions than
        the map (Captum's GuidedGradCam gives an empty tensor there)."""
        if not isinstance(self.gradient, tuple):
            return cam_maths.guided_gradcam(self.cam, self.gradient)
        layer = self._first()
        raw = layer.cam_raw
        return tuple(cam_maths.guided_gradcam(cam_maths.upsample(raw, g.shape[2:], layer.interpolate), g)
                     if g.dim() - 2 == raw.dim() - 1 else None for g in self.gradient)

    @property
    def pixelwise_cam(self) -> Tensor:
        """HiResCAM resized to the input (``cams["hirescam"]``)."""
        return self._first().pixelwise_cam

    @property
    def guided_pixelwise_cam(self) -> Tensor:
        """LayerCAM resized to the input (``cams["layercam"]``)."""
        return self._first().guided_pixelwise_cam

    @property
    def cams(self) -> CamMaps:
        """Every registered CAM (``guided_swap.cam_methods()``) of the first layer, resized to the input."""
        return self._first().cams

    @property
    def cams_raw(self) -> CamMaps:
        """Every registered CAM of the first layer at its resolution."""
        return self._first().cams_raw

    def cam_map(self, name: str = "gradcam", *, layer: Optional[str] = None, signed: bool = False,
                per_channel: bool = False, eigen_smooth: bool = False, resize: bool = False) -> Tensor:
        """The CAM ``name`` of ``layer`` (default: the first) with options: :meth:`LayerMaps.cam_map`.

        ``e.cam_map("gradcam", signed=True, per_channel=True)`` is Captum's
        ``LayerGradCam(...).attribute(x, target, relu_attributions=False, attr_dim_summation=False)``.

        >>> A, G = torch.rand(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
        >>> e = Explanation(torch.zeros(2, 5), None, torch.zeros(2), torch.zeros(2, 3, 12, 12),
        ...                 {"layer4": LayerMaps(A, G, (12, 12))})
        >>> tuple(e.cam_map("hirescam", signed=True, per_channel=True).shape), tuple(e.cam_map(resize=True).shape)
        ((2, 4, 3, 3), (2, 12, 12))
        """
        return self._layer(layer).cam_map(name, signed=signed, per_channel=per_channel, eigen_smooth=eigen_smooth,
                                          resize=resize)

    def fused(self, name: str = "gradcam", layers: Optional[Sequence[str]] = None, *, how: str = "mean",
              eigen_smooth: bool = False) -> Tensor:
        """One (B, *input spatial) map in [0, 1] from the CAM ``name`` of several ``layers`` (default: every
        captured layer), fused ``how="mean"`` (pytorch-grad-cam given several target layers) or ``"product"``
        (its RefineCAM); see :func:`guided_swap.core.cam_options.fuse`. With one layer, ``"mean"`` is
        pytorch-grad-cam's scaled map of that layer; ``eigen_smooth`` is its ``eigen_smooth=True``.

        >>> A, G = torch.rand(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
        >>> e = Explanation(torch.zeros(2, 5), None, torch.zeros(2), torch.zeros(2, 3, 12, 12),
        ...                 {"layer3": LayerMaps(A, G, (12, 12)),
        ...                  "layer4": LayerMaps(A[..., ::2, ::2], G[..., ::2, ::2], (12, 12))})
        >>> fused = e.fused("layercam", how="product")
        >>> tuple(fused.shape), float(fused.min()), round(float(fused.max()), 4)
        ((2, 12, 12), 0.0, 1.0)
        """
        if isinstance(layers, str):
            layers = [layers]
        chosen = [self._layer(layer) for layer in (list(self.layers) if layers is None else layers)]
        if not chosen:
            raise LayerError("fused() needs at least one layer")
        maps = [m.cam_map(name, eigen_smooth=eigen_smooth) for m in chosen]
        return cam_options.fuse(maps, chosen[0].input_size, how, chosen[0].interpolate)

    def _layer(self, layer: Optional[str]) -> LayerMaps:
        if layer is None:
            return self._first()
        if layer not in self.layers:
            raise LayerError(f"layer {layer!r} is not captured by this explanation; captured: {list(self.layers)}")
        return self.layers[layer]

    def __len__(self) -> int:
        return self.score.shape[0]

    def __getitem__(self, index: Union[int, slice]) -> "Explanation":
        rows = _rows(index, len(self))
        outputs = _slice_tree(self.outputs, rows, len(self))
        gradient = tuple(g[rows] for g in self.gradient) if isinstance(self.gradient, tuple) else self.gradient[rows]
        return replace(self, logits=self.logits[rows], target=None if self.target is None else self.target[rows],
                       score=self.score[rows], gradient=gradient, outputs=outputs,
                       layers={name: maps[rows] for name, maps in self.layers.items()})

    def of_input(self, index: int) -> "Explanation":
        """The explanation of input ``index`` of several (``explain((x1, x2))``): its gradient alone, and every
        layer's maps resized to that input where it has the map's number of spatial dimensions (what a figure of
        that input draws)."""
        if not isinstance(self.gradient, tuple):
            raise TypeError("of_input() picks one input of an explanation of several inputs; this one has one")
        gradient = self.gradient[index]
        size = tuple(gradient.shape[2:])
        layers = {name: replace(maps, input_size=size) if len(size) == len(maps.input_size) else maps
                  for name, maps in self.layers.items()}
        return replace(self, gradient=gradient, layers=layers)

    @property
    def gradients(self) -> Tuple[Tensor, ...]:
        """The input gradient of every input, as a tuple (one entry for a model with one input)."""
        return self.gradient if isinstance(self.gradient, tuple) else (self.gradient,)

    def available(self) -> Tuple[str, ...]:
        """The names :meth:`to_dict` accepts for this explanation (``gradient.0``, ``gradient.1``, ... and
        ``guided_gradcam.0``, ... for several inputs)."""
        several = isinstance(self.gradient, tuple)
        names = ["logits", "target", "score"]
        names += [f"gradient.{i}" for i in range(len(self.gradient))] if several else ["gradient"]
        if self.layers:
            guided = [f"guided_gradcam.{i}" for i, g in enumerate(self.guided_gradcam) if g is not None] \
                if several else ["guided_gradcam"]
            names += ["cam_raw", "cam"] + guided + ["pixelwise_cam", "guided_pixelwise_cam"]
            names += [f"{kind}.{cam}" for kind in ("cams", "cams_raw") for cam in self._first().cams]
        if len(self.layers) > 1:
            names += [f"layers.{layer}.{kind}" for layer in self.layers for kind in ("cam_raw", "cam")]
        return tuple(name for name in names if name != "target" or self.target is not None)

    def to_dict(self, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """The maps by name: by default logits, target, score, gradient and, with a layer, cam_raw, cam and
        guided_gradcam (and ``layers.NAME.cam``/``cam_raw`` for every layer when there are several)."""
        available = self.available()
        if names is None:
            names = [n for n in available if n not in ("pixelwise_cam", "guided_pixelwise_cam")
                     and not n.startswith("cams")]
        unknown = [name for name in names if name not in available]
        if unknown:
            raise ValueError(f"{unknown} are not maps of this explanation; available: {list(available)}")
        return {name: self._get(name) for name in names}

    def _get(self, name: str) -> Tensor:
        kind, _, index = name.partition(".")
        if kind in ("gradient", "guided_gradcam") and index.isdigit():
            return getattr(self, kind)[int(index)]
        if name.startswith("layers."):
            layer, kind = name[len("layers."):].rsplit(".", 1)
            return getattr(self.layers[layer], kind)
        if name.startswith("cams.") or name.startswith("cams_raw."):
            kind, cam = name.split(".", 1)
            return getattr(self, kind)[cam]
        return getattr(self, name)


def explanation_from_pass(result: PassResult, *, layers: Sequence[str], logits: Tensor, input_size: Sequence[int],
                          interpolate: str = "bilinear", rule: str = "guided", swapped: Optional[int] = None,
                          layouts: Optional[Dict[str, Layout]] = None,
                          input_sizes: Optional[Sequence[Tuple[int, ...]]] = None,
                          layer_inputs: Optional[Mapping] = None) -> Explanation:
    """The :class:`Explanation` of one pass: the one place maps are assembled.

    ``layouts`` (the conversion report's) say how each capture becomes (B, C, *spatial); a layer without one
    is taken as channels first. With several inputs, ``input_sizes`` holds each input's spatial size and
    ``layer_inputs`` which inputs each layer is computed from: a layer's maps are resized to the first of those
    (else of all inputs) with as many spatial dimensions as the map.
    """
    layouts = layouts or {}
    layer_maps = {}
    for name, a, g in zip(layers, result.captures, result.layer_grads):
        layout = layouts.get(name, CHANNELS_FIRST)
        size = tuple(input_size) if not input_sizes else _size_for(_tensor(a, name), layout, input_sizes,
                                                                   (layer_inputs or {}).get(name))
        layer_maps[name] = LayerMaps(_tensor(a, name).detach(), g, size, interpolate, layout, name)
    return Explanation(logits.detach(), result.classes, result.score.detach(), result.input_grad, layer_maps,
                       detach_tree(result.outputs), rule, swapped)


def _size_for(activation: Tensor, layout: Layout, sizes: Sequence[Tuple[int, ...]],
              feeding: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """The spatial size a layer's maps are resized to when there are several inputs (explanation_from_pass)."""
    rank = len(layout.grid) if layout.kind == "tokens" and layout.grid else (2 if layout.kind == "tokens"
                                                                              else activation.dim() - 2)
    order = list(feeding or ()) + [i for i in range(len(sizes)) if i not in (feeding or ())]
    return next((tuple(sizes[i]) for i in order if len(sizes[i]) == rank), tuple(sizes[order[0]]))


def zero_gradient_messages(explanation: Explanation, layers: bool = True) -> List[str]:
    """One line for each gradient of ``explanation`` that is zero everywhere for some sample: the maps made
    from it are then all zero and show nothing, though they look like an answer. ``layers=False`` reads the
    input gradient only (a channel target: layers after the channel's own get no gradient, by design).

    >>> import torch
    >>> layer = LayerMaps(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), (8, 8))
    >>> e = Explanation(torch.zeros(2, 5), None, torch.zeros(2), torch.ones(2, 3, 8, 8), {"layer4": layer})
    >>> zero_gradient_messages(e)[0][:72]
    "the ordinary gradient at layer 'layer4' is zero everywhere for sample(s)"
    """
    messages, dead = [], set()
    for name, maps in explanation.layers.items() if layers else ():
        samples = _zero_samples(maps.grad)
        dead.update(samples)
        if samples:
            messages.append(f"the ordinary gradient at layer {name!r} is zero everywhere for sample(s) "
                            f"{listing(samples)}, so every CAM there is zero: the score does not depend on this "
                            "layer. An untrained or zero-initialised head (torchvision's ViT starts its head at "
                            "zero) or a target that ignores the input does this")
    gradients = explanation.gradients
    for index, gradient in enumerate(gradients):
        samples = [i for i in _zero_samples(gradient) if i not in dead]
        if samples:
            which = f" at input {index}" if len(gradients) > 1 else ""
            messages.append(f"the {explanation.rule!r} gradient{which} is zero everywhere for sample(s) "
                            f"{listing(samples)}, so e.gradient and Guided Grad-CAM are zero there: no gradient "
                            "reaches the input under this rule")
    return messages


def _zero_samples(tensor: Tensor) -> List[int]:
    if tensor.dim() == 0 or tensor.shape[0] == 0 or tensor[0].numel() == 0:
        return []
    return torch.nonzero(~tensor.detach().reshape(tensor.shape[0], -1).any(dim=1)).flatten().tolist()


def listing(items: Sequence[Any], shown: int = 5) -> str:
    """The first ``shown`` of ``items`` for a message: ``"a, b, c and 4 more"``."""
    text = ", ".join(str(i) for i in items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise LayerError(f"layer {name!r} produced a {type(value).__name__}, not a tensor; capture a tensor-valued node")
    return value


def _rows(index: Union[int, slice], length: Optional[int] = None) -> slice:
    if isinstance(index, bool) or not isinstance(index, (int, slice)):
        raise TypeError(f"index an explanation with an int or a slice, got {type(index).__name__}")
    if isinstance(index, slice):
        return index
    if length is not None and not -length <= index < length:
        raise IndexError(f"sample {index} is out of range for a batch of {length}")
    index = index % length if length else index
    return slice(index, index + 1)


def detach_tree(outputs: Any) -> Any:
    """``outputs`` (any nesting of containers) with every tensor detached."""
    return torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, outputs)


def _slice_tree(outputs: Any, rows: slice, batch: int) -> Any:
    """The model's outputs for the samples ``rows``, cut by what each part is.

    A list of dicts is torchvision's detection format, one dict per image: the list is cut and each image's
    dict kept whole (its tensors are per detection, however many there are). Any other tensor is batch-major,
    as a model's output is (logits, a tuple or dict of heads): it is cut along its first dimension, or kept
    whole when that is not the batch. Other values are kept.
    """
    def cut(value: Any) -> Any:
        if _per_image_records(value):
            return value[rows] if len(value) == batch else value  # not one per image: not cut
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
            return value[rows]
        return value

    return torch.utils._pytree.tree_map(cut, outputs, is_leaf=_per_image_records)


def _per_image_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)
