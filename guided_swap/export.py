"""Export an explainer as one static ``torch.export`` program: forward, the rule's backward and the CAM maths.

``make_fx`` traces a whole :meth:`Explainer.explain` (weights passed in through ``functional_call``), which
runs the custom backward while tracing and records it as plain aten ops; ``torch.export`` then makes that
graph a portable ``.pt2`` with a dynamic batch dimension. Loading it needs torch only:

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
from torch.fx.experimental.proxy_tensor import make_fx

from ._files import atomic_write
from .errors import ExportError, GuidedSwapError
from .explainer import Explainer
from .maps import explanation_from_pass
from .targets import select_output

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


def _explain_function(explainer: Explainer, interpolate: str):
    def explain(state: Dict[str, Tensor], x: Tensor, target: Tensor):
        def scorer(outputs, captures, classes):
            logits = select_output(outputs, explainer.output)
            return logits.gather(1, target.view(-1, 1)).squeeze(1), target

        call = lambda leaf: torch.func.functional_call(explainer.graph_module, state, (leaf,))
        result = explainer.forward_backward(x, scorer, call)
        explanation = explanation_from_pass(result, layers=explainer.layers, logits=explainer._select(result.outputs),
                                            input_size=x.shape[2:], interpolate=interpolate)
        return explanation.to_dict([name for name in EXPORTED_MAPS if name in explanation.available()])

    return explain


def export_program(explainer: Explainer, example_input: Optional[Tensor] = None, *, interpolate: str = "bilinear",
                   dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """The explainer as an ``ExportedProgram``: ``program.module()(x, target) -> dict`` of maps."""
    if not isinstance(explainer, Explainer):
        raise TypeError(f"export() takes an Explainer from guided_swap.convert(), got {type(explainer).__name__}")
    x = _example(explainer, example_input)
    explainer._ensure_built(x)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    state = {k: v.detach() for k, v in list(explainer.graph_module.named_parameters()) +
             list(explainer.graph_module.named_buffers())}
    try:
        graph = make_fx(_explain_function(explainer, interpolate), tracing_mode="symbolic")(
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


def export(explainer: Explainer, example_input: Tensor, path: str, **options) -> "torch.export.ExportedProgram":
    """Export ``explainer`` to ``path`` (``.pt2``), written atomically. Returns the program."""
    program = export_program(explainer, example_input, **options)
    with atomic_write(path, suffix=".pt2") as temporary:
        torch.export.save(program, temporary)
    return program


def _batch_symbolic(state: Dict[str, Tensor], x: Tensor, target: Tensor, dynamic_batch: bool):
    """Fake inputs whose batch size alone is symbolic: tracing with every size symbolic is ~7x slower
    (densenet121: 83 s against 12 s), and only the batch needs to vary."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    first = DimDynamic.DYNAMIC if dynamic_batch else DimDynamic.STATIC

    def fake(tensor: Tensor):
        sizes = [first] + [DimDynamic.STATIC] * (tensor.dim() - 1)
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    return {k: mode.from_tensor(v, static_shapes=True) for k, v in state.items()}, fake(x), fake(target)


def _example(explainer: Explainer, example_input: Optional[Tensor]) -> Tensor:
    if example_input is None:
        raise TypeError("export needs an example input, e.g. torch.randn(2, 3, 224, 224); its batch size is made dynamic")
    explainer._check_input(example_input)
    if example_input.shape[0] < 2:  # a batch of 1 would be specialised by torch.export
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input
