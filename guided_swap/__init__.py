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
from ._version import __version__
from .cam import CamError, cam_methods, register_cam, unregister_cam
from .build import ConversionReport, convert
from .errors import (CommandError, ExportError, GuidedSwapError, InputError, LayerError, LoadError, OutputError,
                     RuleError, TargetError, TraceError, ZeroGradientWarning)
from .explainer import Explainer, load
from .layouts import Layout
from .export import export, export_program
from .maps import Explanation, LayerMaps
from .rules import Rule, get_rule, register_rule, rules, unregister_rule
from .runtime_explainer import RuntimeExplainer, convert_runtime
from .targets import Box, Channel


def layer_names(model, tracer_kwargs=None):
    """The names ``convert(layer=...)`` accepts: ``{"modules": [...], "nodes": [...]}`` in graph order."""
    from .capture import layer_names as _names
    from .trace import trace

    return _names(trace(model, tracer_kwargs))


__all__ = ["convert", "Explainer", "Explanation", "LayerMaps", "ConversionReport", "Channel", "Box", "convert_runtime", "RuntimeExplainer", "layer_names", "load",
           "export", "export_program", "cam", "Rule", "rules", "register_rule", "unregister_rule", "get_rule",
           "GuidedSwapError", "TraceError", "LayerError", "TargetError", "InputError", "OutputError", "RuleError",
           "LoadError", "ExportError", "CommandError", "__version__", "cam_methods", "register_cam", "unregister_cam",
           "CamError", "Layout", "ZeroGradientWarning"]
