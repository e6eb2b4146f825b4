"""guided_swap: convert a CNN once into an explainer that gives guided backprop, Grad-CAM and Guided
Grad-CAM in one forward/backward pass, for every ReLU spelling.

The package is laid out by stage (docs/architecture.md): ``core`` (rules, CAM maths, maps, targets, layouts,
report), ``capture`` (the capture contract and its fx/export and run-time paths), ``run`` (the explainer,
SmoothGrad, compile, saved files and exported programs), ``media`` (images, labels, figures), ``checks``
(the fx-free reference, sanity checks, benchmark, demo) and ``app`` (the command line and folder runs).

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.vgg11().eval(), layer="features.18")
>>> e = ex.explain(torch.randn(1, 3, 64, 64))
>>> e.gradient.shape, e.cam.shape
(torch.Size([1, 3, 64, 64]), torch.Size([1, 64, 64]))
"""
import importlib
import warnings

from . import _aliases
from ._version import __version__
from .capture.base import Capture
from .core import cam
from .core.cam import CamError, cam_methods, register_cam, unregister_cam
from .core.errors import (CommandError, ExportError, GuidedSwapError, InputError, LayerError, LoadError, OutputError,
                          RuleError, RunError, TargetError, TraceError, ZeroGradientWarning)
from .core.layout import Layout
from .core.maps import Explanation, LayerMaps
from .core.report import ConversionReport
from .core.rules import Rule, get_rule, register_rule, rules, unregister_rule
from .core.finer import Finer
from .core.targets import Box, BoxMatch, Channel
from .media import images, viz
from .run.convert import convert, convert_runtime, layer_names
from .run.explainer import Explainer, load
from .run.program import export, export_program

_aliases.install()

#: Modules reachable as ``guided_swap.NAME`` (``from guided_swap import reference``), imported when first used.
_PUBLIC_MODULES = {"reference": "checks.reference", "sanity": "checks.sanity", "demo": "checks.demo",
                   "metrics": "checks.metrics",
                   "labels": "media.labels", "smoothing": "run.smoothing"}


def __getattr__(name):
    if name in _PUBLIC_MODULES:
        return importlib.import_module(f"{__name__}.{_PUBLIC_MODULES[name]}")
    if name == "RuntimeExplainer":
        warnings.warn("guided_swap.RuntimeExplainer is gone: every capture path gives a guided_swap.Explainer; a "
                      "run-time one holds a guided_swap.capture.runtime.runtime_capture.RuntimeCapture as "
                      "explainer.capture", DeprecationWarning, stacklevel=2)
        return Explainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["convert", "Explainer", "Explanation", "LayerMaps", "ConversionReport", "Channel", "Box", "BoxMatch", "Finer",
           "convert_runtime",
           "Capture", "layer_names", "load", "export", "export_program", "cam", "Rule", "rules", "register_rule",
           "unregister_rule", "get_rule", "GuidedSwapError", "TraceError", "LayerError", "TargetError", "InputError",
           "OutputError", "RuleError", "LoadError", "ExportError", "CommandError", "RunError", "__version__",
           "cam_methods", "register_cam", "unregister_cam", "CamError", "Layout", "ZeroGradientWarning", "images", "viz"]
