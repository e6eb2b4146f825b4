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
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from .._files import atomic_write
from ..capture.base import Capture
from ..core.errors import ExportError, GuidedSwapError
from ..core.inputs import Inputs
from ..core.targets import ClassScore
from .assemble import explanation_of
from .explainer import Explainer

#: The maps an exported program returns.
EXPORTED_MAPS = ("logits", "gradient", "cam_raw", "cam", "guided_gradcam")


class _Traced(nn.Module):
    """The make_fx graph with the weights it takes as inputs held as buffers, so torch.export sees a module.

    The graph is held as ``traced``, never ``graph``: the make_fx graph keeps the tensors it made from Python
    numbers (Swin's shifted-window mask) as ``_tensor_constant*`` attributes, and the module torch.export rebuilds
    on ``program.module()`` is a ``GraphModule``, whose ``graph`` is its fx graph, so ``graph._tensor_constant0``
    would name nothing there."""

    def __init__(self, traced: nn.Module, state: Dict[str, Tensor]):
        super().__init__()
        self.traced = traced
        self.names = list(state)
        for index, tensor in enumerate(state.values()):
            self.register_buffer(f"w{index}", tensor)

    def forward(self, *inputs_and_target: Tensor):
        return self.traced({name: getattr(self, f"w{i}") for i, name in enumerate(self.names)}, *inputs_and_target)


class _Pass(nn.Module):
    """One pass of a capture as a module whose only submodule is the capture's explain graph, so
    ``functional_call`` runs the pass on the weights make_fx passes in (and puts the graph's own back after)."""

    def __init__(self, capture: Capture, interpolate: str):
        super().__init__()
        self.graph = capture.graph_module
        object.__setattr__(self, "_capture", capture)  # not a submodule: its other modules are not traced
        self.interpolate = interpolate

    def forward(self, *inputs_and_target: Tensor) -> Dict[str, Tensor]:
        capture = self._capture
        *inputs, target = inputs_and_target
        x = inputs[0] if len(inputs) == 1 else Inputs(tuple(inputs))
        result = capture.run(x, ClassScore(target, capture.output, mode="given"))
        explanation = explanation_of(capture, result, inputs[0].shape[2:], self.interpolate,
                                     [tuple(t.shape[2:]) for t in inputs] if len(inputs) > 1 else None)
        return explanation.to_dict([name for name in explanation.available() if name.split(".")[0] in EXPORTED_MAPS])


def _explain_function(capture: Capture, interpolate: str):
    one_pass = _Pass(capture, interpolate)

    def explain(state: Dict[str, Tensor], *inputs_and_target: Tensor):
        return torch.func.functional_call(one_pass, state, inputs_and_target)

    return explain


def export_program(explainer: Explainer, example_input: Any = None, *, interpolate: str = "bilinear",
                   dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """The explainer as an ``ExportedProgram``: ``program.module()(x, target) -> dict`` of maps; for a model with
    several inputs, ``example_input`` is a tuple and the program takes ``(x1, x2, ..., target)`` and gives
    ``gradient.0``, ``gradient.1``, ... (and ``guided_gradcam.i`` for each input of the map's rank).

    Its CAMs read each capture with the explainer's layouts (a ViT's tokens, a Swin's channels-last maps), as
    ``explain`` does. A capture without a graph (the run-time capture) cannot be exported. The program is run
    once on the example and its maps compared with the eager explainer's: one that fails or differs raises
    :class:`ExportError` instead of being returned."""
    program, reference = _program(explainer, example_input, interpolate, dynamic_batch)
    _verify(program, reference)
    return program


def _program(explainer: Explainer, example_input: Any, interpolate: str, dynamic_batch: bool):
    """The unchecked program, and the reference to check it with: the example's arguments and eager maps."""
    if not isinstance(explainer, Explainer):
        raise TypeError(f"export() takes an Explainer from guided_swap.convert(), got {type(explainer).__name__}")
    inputs = _example(explainer, example_input)
    call = inputs[0] if not isinstance(example_input, tuple) else Inputs(tuple(inputs))
    capture = explainer.capture_for(call)
    if capture.signature is not None and capture.signature.extra:
        raise ExportError("this explainer's model is called with forward_args, which an exported program does not "
                          "take; export the explainer of a model called with its inputs alone")
    capture.prepare(call)
    if capture.graph_module is None:
        raise ExportError(_NO_GRAPH)
    target = torch.zeros(inputs[0].shape[0], dtype=torch.long, device=inputs[0].device)
    one_pass = _Pass(capture, interpolate)
    arguments = tuple(inputs) + (target,)
    reference = (arguments, {k: v.detach() for k, v in one_pass(*arguments).items()})
    state = {k: v.detach() for k, v in list(one_pass.named_parameters()) + list(one_pass.named_buffers())}
    try:
        graph = make_fx(_explain_function(capture, interpolate), tracing_mode="symbolic")(
            *_batch_symbolic(state, inputs + [target], dynamic_batch))
        batch = torch.export.Dim("batch", min=1, max=65536) if dynamic_batch else None
        shapes = (tuple({0: batch} for _ in range(len(inputs) + 1)),) if dynamic_batch else None  # forward(*args)
        return torch.export.export(_Traced(graph, state), arguments, dynamic_shapes=shapes), reference
    except GuidedSwapError:
        raise
    except Exception as error:  # torch.export's many failure types
        raise ExportError(
            f"torch.export could not capture this explainer: {type(error).__name__}: {str(error)[:2000]}\n"
            "  hint: the eager explainer and ex.save() still work; data-dependent control flow or ops without a "
            "symbolic-shape rule are the usual cause (try dynamic_batch=False)") from error


#: How far an exported map may be from the eager one, as a fraction of the eager map's largest value, by the
#: dtype of the map or of the model's output (a half model's float32 CAMs are made from half A and G).
_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
_FLOAT_TOLERANCE = 1e-4


def _tolerance(*dtypes: torch.dtype) -> float:
    return max(_TOLERANCE.get(dtype, _FLOAT_TOLERANCE) for dtype in dtypes)


def _verify(program: "torch.export.ExportedProgram", reference) -> None:
    """Run ``program`` on the example and compare its maps with the eager explainer's, or raise ExportError."""
    arguments, expected = reference
    try:
        got = program.module()(*arguments)
    except Exception as error:  # whatever the broken program raises
        raise ExportError(f"the exported program does not run: {type(error).__name__}: {str(error)[:2000]}\n"
                          f"{_VERIFY_HINT}") from error
    if not isinstance(got, dict) or sorted(got) != sorted(expected):
        raise ExportError(f"the exported program gives {sorted(got) if isinstance(got, dict) else type(got)}, not "
                          f"the explainer's maps {sorted(expected)}\n{_VERIFY_HINT}")
    model_dtype = expected["logits"].dtype
    for name, want in expected.items():
        difference = _difference(got[name], want, _tolerance(want.dtype, model_dtype))
        if difference is not None:
            raise ExportError(f"the exported program's {name!r} differs from the explainer's on the example: "
                              f"{difference}\n{_VERIFY_HINT}")


def _difference(got: Tensor, want: Tensor, tolerance: float) -> Optional[str]:
    """None when ``got`` equals ``want`` to ``tolerance`` times ``want``'s largest value; otherwise how they
    differ."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} against {tuple(want.shape)}"
    if not torch.equal(got.isnan(), want.isnan()):
        return "NaN at other positions"
    if want.numel() == 0:
        return None
    got, expected = got.detach().double().nan_to_num(0.0), want.double().nan_to_num(0.0)
    scale, worst = float(expected.abs().max()), float((got - expected).abs().max())
    if worst <= tolerance * scale:
        return None
    return f"largest difference {worst:.3g}, where the map's largest value is {scale:.3g}"


_VERIFY_HINT = ("  hint: nothing was written; the eager explainer and ex.save() still work (please report the model "
                "if you can share it)")


_NO_GRAPH = ("this explainer was captured at run time (capture='runtime': chosen with convert(capture=...), or "
             "taken because neither torch.fx nor torch.export could take the model), so it has no graph to export; "
             "explain eagerly, or save it with ex.save()")


def export(explainer: Explainer, example_input: Tensor, path: str, *, interpolate: str = "bilinear",
           dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """Export ``explainer`` to ``path`` (``.pt2``), written atomically. Returns the program.

    The file is loaded back and run on the example before it takes ``path``: a program that does not load, run or
    give the explainer's maps raises :class:`ExportError` and nothing is written."""
    program, reference = _program(explainer, example_input, interpolate, dynamic_batch)
    with atomic_write(path, suffix=".pt2") as temporary:
        torch.export.save(program, temporary)
        _verify(_load(temporary), reference)
    return program


def _load(path: str) -> "torch.export.ExportedProgram":
    """The program just written to ``path``, or ExportError."""
    try:
        return torch.export.load(path)
    except Exception as error:  # torch's many deserialisation failures
        raise ExportError(f"the exported program does not load back: {type(error).__name__}: {str(error)[:2000]}"
                          f"\n{_VERIFY_HINT}") from error


def _batch_symbolic(state: Dict[str, Tensor], tensors: List[Tensor], dynamic_batch: bool):
    """Fake inputs whose batch size alone is symbolic (one symbol shared by every input and the target): tracing
    with every size symbolic is ~7x slower (densenet121: 83 s against 12 s), and only the batch needs to vary."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    first = DimDynamic.DYNAMIC if dynamic_batch else DimDynamic.STATIC

    def fake(tensor: Tensor):
        sizes = [first] + [DimDynamic.STATIC] * (tensor.dim() - 1)
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    return ({k: mode.from_tensor(v, static_shapes=True) for k, v in state.items()},
            *(fake(tensor) for tensor in tensors))


def _example(explainer: Explainer, example_input: Any) -> List[Tensor]:
    """The example's input tensors, each of a batch of 2 at least (a batch of 1 would be specialised)."""
    if example_input is None:
        raise TypeError("export needs an example input, e.g. torch.randn(2, 3, 224, 224) (a tuple of tensors for a "
                        "model with several inputs); its batch size is made dynamic")
    call = Inputs(tuple(example_input)) if isinstance(example_input, tuple) else example_input
    explainer.capture_for(call).check(call)
    tensors = list(example_input) if isinstance(example_input, tuple) else [example_input]
    return [t.expand(2, *t.shape[1:]).contiguous() if t.shape[0] < 2 else t for t in tensors]
