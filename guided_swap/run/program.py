"""Export an explainer as one static ``torch.export`` program: forward, the rule's backward and the CAM maths.

``make_fx`` traces a whole :meth:`Explainer.explain` (weights passed in through ``functional_call``), which
runs the custom backward while tracing and records it as plain aten ops; ``torch.export`` then makes that
graph a portable ``.pt2`` with a dynamic batch dimension. Loading it needs torch only, and trusts the file
completely: ``torch.export.load`` unpickles its weights and constants, which can run any code, so open only
programs you made or trust (a saved ``.gsx`` loads without running code from the file):

>>> import torch, torchvision, guided_swap as gs, tempfile, os
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> path = os.path.join(tempfile.mkdtemp(), "resnet18.pt2")
>>> _ = gs.export(ex, torch.randn(2, 3, 64, 64), path)
>>> out = torch.export.load(path).module()(torch.randn(3, 3, 64, 64), torch.tensor([1, 2, 3]))
>>> sorted(out), tuple(out["cam"].shape)
(['cam', 'cam_raw', 'gradient', 'guided_gradcam', 'logits'], (3, 64, 64))
"""
from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from .._files import atomic_write
from ..capture.base import Capture
from ..core.errors import ExportError, GuidedSwapError
from ..core.targets import ClassScore
from .assemble import explanation_of
from .explainer import Explainer

#: The maps an exported program returns.
EXPORTED_MAPS = ("logits", "gradient", "cam_raw", "cam", "guided_gradcam")


class _Traced(nn.Module):
    """The make_fx graph with the weights it takes as inputs held as buffers, so torch.export sees a module."""

    def __init__(self, graph: nn.Module, state: Dict[str, Tensor]):
        super().__init__()
        self.graph = graph
        self.names = list(state)
        for index, tensor in enumerate(state.values()):
            self.register_buffer(f"w{index}", tensor)

    def forward(self, x: Tensor, target: Tensor):
        return self.graph({name: getattr(self, f"w{i}") for i, name in enumerate(self.names)}, x, target)


class _Pass(nn.Module):
    """One pass of a capture as a module whose only submodule is the capture's explain graph, so
    ``functional_call`` runs the pass on the weights make_fx passes in (and puts the graph's own back after)."""

    def __init__(self, capture: Capture, interpolate: str):
        super().__init__()
        self.graph = capture.graph_module
        object.__setattr__(self, "_capture", capture)  # not a submodule: its other modules are not traced
        self.interpolate = interpolate

    def forward(self, x: Tensor, target: Tensor) -> Dict[str, Tensor]:
        capture = self._capture
        result = capture.run(x, ClassScore(target, capture.output, mode="given"))
        explanation = explanation_of(capture, result, x.shape[2:], self.interpolate)
        return explanation.to_dict([name for name in EXPORTED_MAPS if name in explanation.available()])


def _explain_function(capture: Capture, interpolate: str):
    one_pass = _Pass(capture, interpolate)

    def explain(state: Dict[str, Tensor], x: Tensor, target: Tensor):
        return torch.func.functional_call(one_pass, state, (x, target))

    return explain


def export_program(explainer: Explainer, example_input: Optional[Tensor] = None, *, interpolate: str = "bilinear",
                   dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """The explainer as an ``ExportedProgram``: ``program.module()(x, target) -> dict`` of maps.

    Its CAMs read each capture with the explainer's layouts (a ViT's tokens, a Swin's channels-last maps), as
    ``explain`` does. A capture without a graph (the run-time capture) cannot be exported."""
    if not isinstance(explainer, Explainer):
        raise TypeError(f"export() takes an Explainer from guided_swap.convert(), got {type(explainer).__name__}")
    x = _example(explainer, example_input)
    capture = explainer.capture
    capture.prepare(x)
    if capture.graph_module is None:
        raise ExportError(_NO_GRAPH)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    one_pass = _Pass(capture, interpolate)
    state = {k: v.detach() for k, v in list(one_pass.named_parameters()) + list(one_pass.named_buffers())}
    try:
        graph = make_fx(_explain_function(capture, interpolate), tracing_mode="symbolic")(
            *_batch_symbolic(state, x, target, dynamic_batch))
        batch = torch.export.Dim("batch", min=1, max=65536) if dynamic_batch else None
        shapes = ({0: batch}, {0: batch}) if dynamic_batch else None
        return torch.export.export(_Traced(graph, state), (x, target), dynamic_shapes=shapes)
    except GuidedSwapError:
        raise
    except Exception as error:  # torch.export's many failure types
        raise ExportError(
            f"torch.export could not capture this explainer: {type(error).__name__}: {str(error)[:2000]}\n"
            "  hint: the eager explainer and ex.save() still work; data-dependent control flow or ops without a "
            "symbolic-shape rule are the usual cause (try dynamic_batch=False)") from error


_NO_GRAPH = ("this explainer was captured at run time (neither torch.fx nor torch.export could take the model), so "
             "it has no graph to export; explain eagerly, or save it with ex.save()")


def export(explainer: Explainer, example_input: Tensor, path: str, **options) -> "torch.export.ExportedProgram":
    """Export ``explainer`` to ``path`` (``.pt2``), written atomically. Returns the program."""
    program = export_program(explainer, example_input, **options)
    with atomic_write(path, suffix=".pt2") as temporary:
        torch.export.save(program, temporary)
    return program


def _batch_symbolic(state: Dict[str, Tensor], x: Tensor, target: Tensor, dynamic_batch: bool):
    """Fake inputs whose batch size alone is symbolic: tracing with every size symbolic is ~7x slower
    (densenet121: 83 s against 12 s), and only the batch needs to vary."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    first = DimDynamic.DYNAMIC if dynamic_batch else DimDynamic.STATIC

    def fake(tensor: Tensor):
        sizes = [first] + [DimDynamic.STATIC] * (tensor.dim() - 1)
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    return {k: mode.from_tensor(v, static_shapes=True) for k, v in state.items()}, fake(x), fake(target)


def _example(explainer: Explainer, example_input: Optional[Tensor]) -> Tensor:
    if example_input is None:
        raise TypeError("export needs an example input, e.g. torch.randn(2, 3, 224, 224); its batch size is made dynamic")
    explainer.capture.check(example_input)
    if example_input.shape[0] < 2:  # a batch of 1 would be specialised by torch.export
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input
