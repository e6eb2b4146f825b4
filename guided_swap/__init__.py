"""guided_swap: convert a CNN once into an explainer that gives guided backprop, Grad-CAM and Guided
Grad-CAM in one forward/backward pass, for every ReLU spelling.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.vgg11().eval(), layer="features.18")
>>> e = ex.explain(torch.randn(1, 3, 64, 64))
>>> e.gradient.shape, e.cam.shape
(torch.Size([1, 3, 64, 64]), torch.Size([1, 64, 64]))
"""
from . import cam
from . import images, viz
from .errors import GuidedSwapError, InputError, LayerError, TargetError, TraceError
from .explainer import ConversionReport, Explainer, Explanation, convert
from .export import ExportError, export, export_program
from .io import LoadError, load
from .targets import Channel

__version__ = "0.1.0"


def layer_names(model, tracer_kwargs=None):
    """The names ``convert(layer=...)`` accepts: ``{"modules": [...], "nodes": [...]}`` in graph order."""
    from .capture import layer_names as _names
    from .trace import trace

    return _names(trace(model, tracer_kwargs))


__all__ = ["convert", "Explainer", "Explanation", "ConversionReport", "Channel", "layer_names", "load", "export",
           "export_program", "cam", "GuidedSwapError", "TraceError", "LayerError", "TargetError", "InputError",
           "LoadError", "ExportError", "__version__"]
