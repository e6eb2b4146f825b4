"""Capturing a model with ``torch.export``, for models that torch.fx symbolic tracing cannot take.

torch.fx runs ``forward`` on proxies, so an ``assert`` on a shape, a Python loop over ``x.shape`` or a
branch on a size stops it. ``torch.export`` (non-strict) runs ``forward`` on fake tensors with symbolic
sizes, so those lines run, and records an aten-level graph. :func:`trace_export` turns that program into
the same :class:`~guided_swap.capture.graph.trace.Traced` the fx path gives: one placeholder (the input), weights read
with ``get_attr`` from a mirror of the model (shared storage, never copies), torchvision-style node names
built from the module path export records (``layer4.1.relu_1``), and what every module returned.

What is fixed at capture time, and how the graph keeps to it:

* the model is captured as deployed (eval mode: BatchNorm reads its running statistics, Dropout is off),
  whatever mode the model is in;
* the graph takes any batch size; other sizes are the example's (or symbolic with ``dynamic_size=True``).
  Each call checks the conditions export recorded on the input's sizes, including those the model's code
  imposed by branching on them, and raises :class:`~guided_swap.core.errors.InputError` for an input outside them;
* state the model writes in ``forward`` (a call counter, BatchNorm forced to batch statistics) is copied
  into the graph's own module, so running the graph never changes the model.

>>> import torch
>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True))
...         self.fc = nn.Linear(8, 2)
...     def forward(self, x):
...         assert x.shape[1] == 3, "RGB only"  # torch.fx stops here
...         return self.fc(self.features(x).mean((2, 3)))
>>> traced = trace_export(Net().eval(), torch.randn(2, 3, 32, 32))
>>> node = traced.module_outputs["features"][0]
>>> node.meta["qualname"], node.target
('features.1', <OpOverload(op='aten.relu_', overload='default')>)
"""
import functools
import math
import operator
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
from torch.fx.node import has_side_effect

from ...core.errors import InputError, TraceError
from ..hooks import HookRecorder, refuse_dropped
from ..mirror import mirror
from .trace import QualnameTracer, Traced, default_leaf_modules, optional_arguments

_TORCH_DIR = Path(torch.__file__).resolve().parent
_PACKAGE_DIR = Path(__file__).resolve().parents[2]  # guided_swap/


# --- capture ------------------------------------------------------------------------------------------

def trace_export(model: nn.Module, example_input: Tensor, *, dynamic_size: bool = False,
                 strict: bool = False) -> Traced:
    """Capture ``model`` with ``torch.export`` for inputs shaped like ``example_input``; return a Traced.

    The batch size stays symbolic, so the graph takes any batch. The other sizes are those of the example
    unless ``dynamic_size=True``, which keeps them symbolic too (the graph then takes other image sizes,
    but capture can take several times longer). Conditions the model's code puts on the sizes are checked
    on every call. ``strict=True`` captures with TorchDynamo instead of running ``forward`` on fake
    tensors. The model itself is never changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_export() takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError("the export capture needs one input tensor shaped like the inputs to explain, e.g. "
                        f"torch.randn(2, 3, 224, 224); got a {type(example_input).__name__} (a detector's list of "
                        "images goes through capture='runtime')")
    root = mirror(model).eval()  # containers of its own: export hooks it, models write caches (EfficientViT)
    example = _example(example_input)
    hooks = HookRecorder(root)
    program = _export(root, model, example, dynamic_size, strict)
    refuse_dropped(hooks.dropped(), "export")
    hooks.remove()
    graph = _unlifted_graph(program, root, tuple(example.shape[1:]), dynamic_size)
    written = _written_state(graph)
    _give_private_copies(root, written)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.meta["guided_swap_private_state"] = written
    leaves = tuple(default_leaf_modules())
    module_outputs = _module_outputs(gm.graph)
    names = _name_nodes(gm.graph, root, leaves, module_outputs)
    return Traced(gm, module_outputs, names, leaves, optional_arguments(model),  # export called it with x alone
                  _module_inputs(gm.graph))


def _example(x: Tensor) -> Tensor:
    """A batch of 1 would be specialised to 1 by export: capture with 2 copies instead."""
    if x.dim() == 0:
        raise InputError("the example input is a scalar; give a batch, e.g. torch.randn(2, 3, 224, 224)")
    x = x.detach()
    return x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x


def _export(root: nn.Module, model: nn.Module, x: Tensor, dynamic_size: bool, strict: bool
            ) -> "torch.export.ExportedProgram":
    dims = {i: torch.export.Dim.AUTO for i in range(x.dim() if dynamic_size else 1)}
    try:
        return torch.export.export(root, (x,), dynamic_shapes=(dims,), strict=strict)
    except Exception as error:  # torch.export's many failure types
        first = (str(error).strip().splitlines() or [""])[0][:500]
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} for an input of shape {tuple(x.shape)}: "
            f"{type(error).__name__}: {first}\n  at {fx_failure_site(error)}\n  {_eager_hint(root, x)}"
        ) from error


def _eager_hint(root: nn.Module, x: Tensor) -> str:
    """Whether the model itself runs on the example (on the mirror: the model is not touched)."""
    try:
        with torch.no_grad():
            root(x)
    except Exception as error:  # the model's own failure, reported in one line
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return (f"the model itself fails on this input ({type(error).__name__}: {first} at "
                f"{fx_failure_site(error)}); give an example input of a size the model takes")
    return ("hint: torch.export takes asserts and branches on shapes, not branches on tensor values "
            "(`if x.sum() > 0`) or Python-side effects that need real values")


# --- the ExportedProgram as a GraphModule on the mirror ------------------------------------------------

def _unlifted_graph(program, root: nn.Module, sizes: Tuple[int, ...], dynamic_size: bool) -> fx.Graph:
    """Copy the program's graph with the input as the only placeholder and state read by ``get_attr``."""
    signature = program.graph_signature
    source = program.graph
    graph = fx.Graph(tracer_cls=ExportGraphTracer)  # kept by copies of the graph; used when unpickling
    env: Dict[fx.Node, Any] = {}
    placeholders = [n for n in source.nodes if n.op == "placeholder"]
    user_input = None
    for node, spec in zip(placeholders, signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            if user_input is not None:
                raise TraceError("the exported program takes more than one input; guided_swap explains models "
                                 "that take one image tensor")
            user_input = env[node] = graph.placeholder(node.name)
            user_input.meta = dict(node.meta)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            env[node] = _state_attribute(graph, root, spec.target, program, node)
        else:
            raise TraceError(f"the exported program takes a {spec.kind.name} input ({spec.target}), which "
                             "guided_swap cannot bind; capture this model with torch.fx instead")
    _insert_shape_check(graph, user_input, program, sizes, dynamic_size)
    output = next(n for n in source.nodes if n.op == "output")
    known = {name for name, _ in root.named_modules(remove_duplicate=False)}
    for node in source.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":  # a submodule of the program (a higher-order op's graph)
            _copy_program_attribute(root, program.graph_module, node.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
        env[node].meta = _with_known_scopes(node.meta, known)
    outputs = [env[a] if isinstance(a, fx.Node) else a
               for a, spec in zip(output.args[0], signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
    graph.output(_built_in_graph(graph, torch.utils._pytree.tree_unflatten(outputs, program.call_spec.out_spec)))
    graph.lint()
    return graph


def _built_in_graph(graph: fx.Graph, value: Any) -> Any:
    """The model's output structure for the output node: a namedtuple becomes a call of its class, as fx's
    own tracer records it (the generated code could not name the class otherwise)."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return graph.call_function(type(value), tuple(_built_in_graph(graph, v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_built_in_graph(graph, v) for v in value)
    if isinstance(value, dict):
        return {k: _built_in_graph(graph, v) for k, v in value.items()}
    return value


def _with_known_scopes(meta: Dict[str, Any], known: set) -> Dict[str, Any]:
    """A node's meta whose module stack names only the model's modules (export adds scopes of its own)."""
    meta = dict(meta)
    if "nn_module_stack" in meta:
        meta["nn_module_stack"] = {key: value for key, value in meta["nn_module_stack"].items() if value[0] in known}
    return meta


def _state_attribute(graph: fx.Graph, root: nn.Module, target: str, program, node: fx.Node) -> fx.Node:
    """``get_attr`` of a parameter, buffer or constant tensor; a constant made in ``forward`` is stored."""
    try:
        _get_attribute(root, target)
    except AttributeError:  # a tensor built inside forward, lifted by export
        _set_attribute(root, target, program.constants[target])
    attribute = graph.get_attr(target)
    attribute.meta = {"val": node.meta.get("val")}
    return attribute


def _get_attribute(root: nn.Module, target: str) -> Any:
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _set_attribute(root: nn.Module, target: str, value: Any) -> None:
    *parents, name = target.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Module):
        module.add_module(name, value)
    else:
        module.register_buffer(name, value, persistent=False)


def _copy_program_attribute(root: nn.Module, program_module: nn.Module, target: str) -> None:
    try:
        _get_attribute(root, target)
    except AttributeError:
        _set_attribute(root, target, _get_attribute(program_module, target))


def _written_state(graph: fx.Graph) -> List[str]:
    """The attributes (parameters, buffers, constants) the graph writes to in place, through any view.

    The training IR keeps in-place ops: ``self.calls += 1`` on a buffer is an ``add_`` on its ``get_attr``.
    """
    written = []
    for attribute in graph.find_nodes(op="get_attr"):
        aliases, pending = {attribute}, [attribute]
        while pending:
            node = pending.pop()
            for user in node.users:
                if _writes(user, node):
                    written.append(attribute.target)
                    pending.clear()
                    break
                if user not in aliases and _is_view_of(user, node):
                    aliases.add(user)
                    pending.append(user)
    return sorted(set(written))


def _schema_arguments(node: fx.Node):
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    positional = list(zip(schema.arguments, node.args))
    return positional + [(a, node.kwargs[a.name]) for a in schema.arguments if a.name in node.kwargs]


def _writes(node: fx.Node, tensor: fx.Node) -> bool:
    if _updates_running_stats(node, tensor):
        return True
    return any(value is tensor and argument.alias_info is not None and argument.alias_info.is_write
               for argument, value in _schema_arguments(node))


def _updates_running_stats(node: fx.Node, tensor: fx.Node) -> bool:
    """``batch_norm(..., training=True)`` updates its running stats, which its schema does not mark."""
    aten = torch.ops.aten
    norms = (aten.batch_norm.default, aten.native_batch_norm.default, aten.instance_norm.default)
    # (input, weight, bias, running_mean, running_var, training / use_input_stats, ...) for all three
    return node.target in norms and len(node.args) > 5 and node.args[5] is True and tensor in node.args[3:5]


def _is_view_of(node: fx.Node, tensor: fx.Node) -> bool:
    """Whether ``node`` returns an alias of ``tensor``: a view op (``view``, ``select``, ``split``, whose
    schema marks its result as an alias), or an item of a list of views."""
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0] is tensor
    schema = getattr(node.target, "_schema", None)
    if schema is None or not any(r.alias_info is not None for r in schema.returns):
        return False
    return any(value is tensor and argument.alias_info is not None for argument, value in _schema_arguments(node))


def _give_private_copies(root: nn.Module, targets: Sequence[str]) -> None:
    """Replace, on the mirror only, each written attribute by a copy: running the explainer never changes
    the model (it keeps its own running count, cache or statistics instead)."""
    for target in targets:
        *parents, name = target.split(".")
        module = root.get_submodule(".".join(parents))
        value = getattr(module, name)
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(value.detach().clone(), value.requires_grad)
        elif name in module._buffers:
            module._buffers[name] = value.detach().clone()
        else:
            module.__dict__[name] = value.detach().clone()


# --- the shape conditions a captured graph holds for ----------------------------------------------------

def _insert_shape_check(graph: fx.Graph, x: fx.Node, program, sizes: Tuple[int, ...], dynamic_size: bool
                        ) -> None:
    guards = tuple(_input_guards(x, program))
    if guards:
        with graph.inserting_after(x):
            graph.call_function(check_input_shape, (x,), {"guards": guards, "example": sizes,
                                                          "dynamic_size": dynamic_size})


def _input_guards(x: fx.Node, program) -> List[str]:
    """Python conditions on ``x`` under which the graph computes the model: sizes fixed at capture, the
    ranges and equalities of the symbolic sizes, and the conditions the model's own code imposed."""
    guards, seen = [], {}
    val = x.meta.get("val")
    for dim, size in enumerate(val.shape if isinstance(val, Tensor) else ()):
        source = f"x.size()[{dim}]"
        if isinstance(size, int):
            guards.append(f"{source} == {size}")
            continue
        expr = size.node.expr
        if expr in seen:
            guards.append(f"{source} == {seen[expr]}")
            continue
        seen[expr] = source
        bounds = program.range_constraints.get(expr)
        if bounds is not None:
            lower, upper = float(bounds.lower), float(bounds.upper)
            if lower > 2:  # export's 0/1 specialisation gives every dynamic size a lower bound of 2
                guards.append(f"{source} >= {int(lower)}")
            if math.isfinite(upper):
                guards.append(f"{source} <= {int(upper)}")
    name = x.name
    for code in getattr(program, "_guards_code", ()):
        guards.append(code.replace(f"L['{name}']", "x").replace("L['flat_args'][0]", "x"))
    return guards


@functools.lru_cache(maxsize=64)
def _compiled_guards(guards: Tuple[str, ...]) -> Tuple[Any, ...]:
    return tuple(compile(code, "<guided_swap shape guard>", "eval") for code in guards)


@has_side_effect
def check_input_shape(x: Tensor, guards: Tuple[str, ...] = (), example: Tuple[int, ...] = (),
                      dynamic_size: bool = False) -> None:
    """Raise :class:`InputError` unless ``x``'s shape meets every condition of the captured graph.

    ``example`` is the shape of one example sample (without the batch), for the message. Inside a tracer
    (symbolic sizes) nothing is checked: the tracer records conditions of its own.
    """
    if not isinstance(x, Tensor) or not all(type(size) is int for size in x.shape):
        return
    scope = {**SYMPY_INTERP, "torch": torch, "math": math, "inf": math.inf, "x": x}
    for code, compiled in zip(guards, _compiled_guards(tuple(guards))):
        if not eval(compiled, scope):  # torch.export's own guard expressions, over x's sizes only
            raise InputError(_guard_message(tuple(x.shape), code, example, dynamic_size))


def _guard_message(shape: Tuple[int, ...], code: str, example: Tuple[int, ...], dynamic_size: bool) -> str:
    captured = f"captured with torch.export from an example of shape (B, {', '.join(map(str, example))})"
    if re.fullmatch(r"x\.size\(\)\[[0-9]+\] == [0-9]+", code) and not dynamic_size:
        return (f"input of shape {shape} does not fit: the graph was {captured} and takes inputs of that "
                f"size only ({code}); convert with an example input of the size you explain, or with "
                "dynamic_size=True to keep the sizes symbolic")
    return (f"input of shape {shape} breaks a condition of the graph {captured}: {code}. The model's code "
            "took a branch that depends on the input size; convert again with an example input of the size "
            "you explain")


class ExportGraphTracer(QualnameTracer):
    """The tracer GraphModule unpickling uses on an export-path graph: the shape check stays one call."""

    def __init__(self, leaf_modules=(), autowrap_functions=(), autowrap_modules=(math,)):
        super().__init__(leaf_modules, (check_input_shape,) + tuple(autowrap_functions), autowrap_modules)


# --- names and module outputs -------------------------------------------------------------------------

def _scopes(node: fx.Node) -> List[Tuple[str, str]]:
    """``(call key, module path)`` of every module call ``node`` lies in, outermost first, the root excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, path) for key, (path, _) in stack.items() if path]


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), Tensor)


def _module_outputs(graph: fx.Graph) -> Dict[str, List[fx.Node]]:
    """For every module call, the tensor it returned: the one node inside its scope used outside it.

    A call that returns several tensors (a tuple) is left out, as on the fx path.
    """
    escaping: Dict[str, List[fx.Node]] = {}
    paths: Dict[str, str] = {}
    order: List[str] = []
    for node in graph.nodes:
        if node.op != "call_function" or not _is_tensor(node):
            continue
        for key, path in _scopes(node):
            if key not in paths:
                paths[key] = path
                order.append(key)
            if any(user.op == "output" or key not in (user.meta.get("nn_module_stack") or {})
                   for user in node.users):
                escaping.setdefault(key, []).append(node)
    outputs: Dict[str, List[fx.Node]] = {}
    for key in order:
        nodes = escaping.get(key, [])
        if len(nodes) == 1:
            outputs.setdefault(paths[key], []).append(nodes[0])
    return outputs


def _module_inputs(graph: fx.Graph) -> Dict[str, List[fx.Node]]:
    """For every module call, the first tensor it is given: the first node from outside its scope that a node
    inside it reads. (Tuple entries are not recovered from an aten graph: ``NAME[i]`` is an fx-path name.)"""
    first: Dict[str, fx.Node] = {}
    paths: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for key, path in _scopes(node):
            if key in first:
                continue
            outside = [a for a in node.all_input_nodes if a.op != "get_attr" and _is_tensor(a) and
                       key not in (a.meta.get("nn_module_stack") or {})]
            if outside:
                first[key], paths[key] = outside[0], path
    inputs: Dict[str, List[fx.Node]] = {}
    for key, node in first.items():
        inputs.setdefault(paths[key], []).append(node)
    return inputs


def _op_name(node: fx.Node) -> str:
    """``aten.add_.Tensor`` -> ``add``; ``operator.floordiv`` -> ``floordiv``: the names fx would give."""
    target = node.target
    name = getattr(getattr(target, "_schema", None), "name", None)
    name = name.split("::")[-1] if name else getattr(target, "__name__", str(target))
    return name.rstrip("_") or name


def _name_nodes(graph: fx.Graph, root: nn.Module, leaves: tuple, module_outputs: Dict[str, List[fx.Node]]
                ) -> Dict[str, fx.Node]:
    """Name nodes as the fx path does: a leaf module's output by the module's path (``layer4.1.relu``, a
    second call ``layer4.1.relu_1``), any other node by its innermost module plus the op (``layer4.1.add``)."""
    tracer = QualnameTracer(leaves)
    returned = {node for nodes in module_outputs.values() for node in nodes}
    counts: Dict[str, int] = {}
    names: Dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op in ("output", "get_attr"):
            continue
        scopes = _scopes(node)
        base = _leaf_call_name(node, scopes, root, tracer, returned)
        if base is None:
            op = node.name if node.op == "placeholder" else _op_name(node)
            base = f"{scopes[-1][1]}.{op}" if scopes else op
        count = counts.get(base, 0)
        counts[base] = count + 1
        qualname = base if count == 0 else f"{base}_{count}"
        node.meta["qualname"] = qualname
        if node.target is not check_input_shape:  # not a layer anyone can capture
            names[qualname] = node
    return names


def _leaf_call_name(node: fx.Node, scopes, root: nn.Module, tracer: fx.Tracer, returned: set) -> Optional[str]:
    """The module path if ``node`` is what an fx leaf module (``nn.ReLU``, ``nn.Conv2d``) returned."""
    if node not in returned:
        return None
    for key, path in scopes:
        try:
            module = root.get_submodule(path)
        except AttributeError:
            return None
        if tracer.is_leaf_module(module, path):
            return path if scopes[-1][0] == key else None
    return None


# --- where fx failed ------------------------------------------------------------------------------------

def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` lies in ``directory``, by path components (``.../torchvision`` is not in ``.../torch``)."""
    return path.parts[:len(directory.parts)] == directory.parts


def _user_frames(error: BaseException) -> List[traceback.FrameSummary]:
    frames = []
    for frame in traceback.extract_tb(error.__traceback__):
        path = Path(frame.filename).resolve()
        if not (_inside(path, _TORCH_DIR) or _inside(path, _PACKAGE_DIR)):
            frames.append(frame)
    return frames


def _short_path(filename: str) -> str:
    """``filename`` relative to the import root it lies under (``timm/models/vgg.py``), else as it is."""
    path = Path(filename).resolve()
    roots = sorted((Path(p).resolve() for p in sys.path if p and os.path.isdir(p)), key=lambda p: -len(p.parts))
    for root in roots:
        if path != root and _inside(path, root):
            return path.relative_to(root).as_posix()
    return filename


def _chain(error: Optional[BaseException]) -> List[BaseException]:
    """``error`` and the errors it wraps (``raise ... from``, or raised while handling), outermost first."""
    chain: List[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


_TRACER_DIRS = tuple(_TORCH_DIR / name for name in ("fx", "_dynamo", "export", "_export", "_subclasses", "utils"))


def fx_failure_site(error: BaseException) -> str:
    """The ``file:line`` of the user's code where tracing failed (the innermost frame outside torch and
    guided_swap; timm and torchvision count as user code). When it failed inside torch's own modules (a
    ``DataParallel`` wrapper, say), the innermost torch frame outside the tracer, as ``file:line in function
    (inside torch)``; ``"unknown"`` when the error has no such frame. A wrapped error (``raise ... from``) is
    followed to its cause.

    >>> import torch
    >>> from guided_swap.capture.graph.trace import trace
    >>> class Checked(torch.nn.Module):
    ...     def forward(self, x):
    ...         assert x.shape[-1] % 8 == 0, "sizes must be multiples of 8"
    ...         return x.relu()
    >>> try:
    ...     trace(Checked())
    ... except Exception as error:
    ...     print(fx_failure_site(error))  # doctest: +ELLIPSIS
    <doctest ...>:3
    """
    chain = _chain(error)
    for cause in reversed(chain):  # the innermost error holds the frames of the model's code
        frames = _user_frames(cause)
        if frames:
            return f"{_short_path(frames[-1].filename)}:{frames[-1].lineno}"
    for cause in reversed(chain):
        frames = [frame for frame in traceback.extract_tb(cause.__traceback__)
                  if _inside(Path(frame.filename).resolve(), _TORCH_DIR)
                  and not any(_inside(Path(frame.filename).resolve(), d) for d in _TRACER_DIRS)]
        if frames:
            return f"{_short_path(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name} (inside torch)"
    return "unknown"


def fx_failure(error: BaseException) -> str:
    """Why torch.fx could not trace a model, in one line: ``fx failed at FILE:LINE`` when the failing line is
    the model's code; else where inside torch (or ``unknown``) and the error itself, which then says more than
    the place (``fx failed at torch/nn/parallel/data_parallel.py:175 in forward (inside torch): TraceError:
    Proxy object cannot be iterated``)."""
    if getattr(error, "short", None):  # a refusal of ours that says itself why (hooks.DroppedHooks)
        return error.short
    site = fx_failure_site(error)
    if site != "unknown" and not site.endswith("(inside torch)"):
        return f"fx failed at {site}"
    innermost = _chain(error)[-1]
    text = (str(innermost).strip().splitlines() or [""])[0]
    text = text.split(". ")[0].rstrip(".")[:160]
    return f"fx failed at {site}: {type(innermost).__name__}" + (f": {text}" if text else "")
