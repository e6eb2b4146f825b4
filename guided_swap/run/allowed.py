"""What a saved explainer may name, and so what loading one may resolve: a fixed allow-list, never an import.

A saved graph names its call targets and module classes by string. Loading looks each string up in the tables
built here from a few namespaces of torch, torchvision and guided_swap; a name that is not in them is refused.
Nothing is imported by a name read from a file, and nothing from the file is called except what these tables
hold, so a file cannot make loading run code of its choosing.

The tables:

- functions (``call_function`` targets): torch's native tensor ops (``torch.cat``: the C functions of
  ``torch._C._VariableFunctions``) and the Python ones of ``torch.functional`` (``torch.split``), the
  ``torch.sym_*`` helpers and ``torch._assert``; the functions of ``torch.nn.functional``; ``aten`` op overloads
  (``aten.conv2d.default``, torch.export's graphs); a fixed set of ``operator`` functions; ``math``;
  ``getattr`` (its attribute checked: :func:`attribute_allowed`); the functions of torch and torchvision that
  ``torch.fx.wrap`` keeps whole (torchvision's Swin attention, ``roi_align``; torch.fx's ``_assert_is_none``);
  guided_swap's own graph functions. Taken out:
  the ops that read or map files, rebind storage or print (``from_file``, ``set_``, ``_print``). An aten name must
  resolve to an op or op overload (``aten.add.Tensor``), never to another attribute of the namespace.
- methods (``call_method`` targets, called on a graph value): the public methods of ``torch.Tensor`` except those
  that call a Python callable, add hooks, touch storage or shared memory, leave torch (``numpy``, ``tolist``) or
  resolve a type by name (``type``).
- module classes: the classes of ``torch.nn.modules``, torchvision's leaf ops modules (those the tracer keeps
  as one call), and guided_swap's ``RuleSlot``.
- constants: dtypes, memory formats and layouts by name.

>>> function("torch.nn.functional.relu") is torch.nn.functional.relu, function_name(torch.cat)
(True, 'torch.cat')
>>> function("os.system")
Traceback (most recent call last):
...
guided_swap.core.errors.LoadError: the file calls 'os.system', which is not among the functions a saved explainer may call (torch ops, torch.nn.functional, aten ops, operator, math, guided_swap's own)
>>> method_allowed("view", ()), method_allowed("register_hook", ()), attribute_allowed("shape")
(True, False, True)
"""
import functools
import inspect
import math
import operator
import pkgutil
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torchvision  # noqa: F401  (its ops modules are among the allowed classes)
from torch import nn
from torch.fx import _symbolic_trace

from ..capture import ops
from ..capture.graph.export_trace import check_input_shape
from ..capture.graph.trace import default_leaf_modules
from ..core.errors import LoadError

_DENIED_OPS = frozenset({"from_file", "set_", "set", "set_data", "_print"})
_DENIED_METHODS = frozenset({
    "apply_", "map_", "map2_", "backward", "register_hook", "register_post_accumulate_grad_hook", "retain_grad",
    "set_", "share_memory_", "storage", "untyped_storage", "storage_type", "numpy", "tolist", "module_load",
    "pin_memory", "record_stream", "from_file"})
_DENIED_ATTRIBUTES = frozenset({"grad_fn"})
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
              "not_", "truth", "and_", "or_", "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge",
              "getitem", "setitem", "contains", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
              "imatmul", "iand", "ior", "ixor", "index")
_F_HELPERS = frozenset({"boolean_dispatch", "handle_torch_function", "has_torch_function",
                        "has_torch_function_unary", "has_torch_function_variadic"})
_F_MODULES = frozenset({"torch.nn.functional", "torch._C._nn", "torch"})
_OWN = {"guided_swap.rectify": ops.rectify, "guided_swap.plain_rectify": ops.plain_rectify,
        "guided_swap.fork_leaf": ops.fork_leaf, "guided_swap.fork_detach": ops.fork_detach,
        "guided_swap.check_input_shape": check_input_shape}
SLOT_CLASS = "guided_swap.capture.ops.RuleSlot"


# --- functions -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _functions() -> Dict[str, Callable]:
    table: Dict[str, Callable] = {}
    natives = torch._C._VariableFunctions
    for name in dir(natives):
        if not name.startswith("_") and name not in _DENIED_OPS and getattr(torch, name, None) is getattr(natives, name):
            table[f"torch.{name}"] = getattr(torch, name)
    extra = list(torch.functional.__all__) + [n for n in dir(torch) if n.startswith("sym_")] + ["_assert"]
    table.update({f"torch.{name}": getattr(torch, name) for name in extra if callable(getattr(torch, name, None))})
    for name in dir(torch.nn.functional):
        value = getattr(torch.nn.functional, name)
        if _is_functional(name, value):
            table[f"torch.nn.functional.{name}"] = value
    table.update({f"operator.{name}": getattr(operator, name) for name in _OPERATORS})
    table.update({f"math.{name}": getattr(math, name) for name in dir(math)
                  if not name.startswith("_") and callable(getattr(math, name))})
    table["builtins.getattr"] = getattr
    table.update(_fx_leaf_functions())
    table.update(_OWN)
    return table


def _fx_leaf_functions() -> Dict[str, Callable]:
    """The functions of torch and torchvision that ``torch.fx.wrap`` keeps whole in a traced graph (torch.fx's
    ``_assert_is_none``, which timm's ViTs call; torchvision's Swin attention and padding, ``roi_align``,
    ``stochastic_depth``, ...), by module and name. Other libraries' wrapped functions are not among them."""
    registered = getattr(_symbolic_trace, "_wrapped_fns_to_patch", {})
    pairs = registered.items() if isinstance(registered, dict) else ((None, p) for p in registered)
    found = [_symbolic_trace._assert_is_none]
    for key, value in pairs:  # (id of globals, name) -> globals; older torch: a list of (globals, name)
        namespace, name = (value, key[1]) if isinstance(value, dict) else value
        found.append(namespace.get(name) if isinstance(namespace, dict) else None)
    return {f"{fn.__module__}.{fn.__qualname__}": fn for fn in found
            if inspect.isfunction(fn) and str(fn.__module__).split(".")[0] in ("torch", "torchvision")}


def _is_functional(name: str, value: Any) -> bool:
    return (not name.startswith("_") and name not in _F_HELPERS and callable(value) and not inspect.isclass(value)
            and getattr(value, "__module__", None) in _F_MODULES)


@functools.lru_cache(maxsize=None)
def _function_names() -> Dict[int, str]:
    names: Dict[int, str] = {}
    for name, value in _functions().items():
        names.setdefault(id(value), name)
    return names


def function_name(target: Any) -> Optional[str]:
    """The allow-list name of a graph's call target, or None when it is not allowed (it then needs trust)."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return _aten_name(target)
    name = _function_names().get(id(target))
    return name if name is not None and _functions()[name] is target else None


def function(name: str) -> Callable:
    """The allowed function a saved graph names; :class:`LoadError` for any other name."""
    if not isinstance(name, str):
        raise LoadError(f"the file names a call target {name!r} that is not a string: the file is damaged or edited")
    if name.startswith("aten."):
        return _aten(name)
    found = _functions().get(name)
    if found is None:
        raise LoadError(f"the file calls {name!r}, which is not among the functions a saved explainer may call "
                        "(torch ops, torch.nn.functional, aten ops, operator, math, guided_swap's own)")
    return found


def _aten_name(target: Any) -> Optional[str]:
    if isinstance(target, torch._ops.OpOverloadPacket):
        namespace, name = target._qualified_op_name.split("::")
        overload = ""
    else:
        namespace, name = target._schema.name.split("::")
        overload = "." + target._overloadname
    return None if namespace != "aten" or name in _DENIED_OPS else f"aten.{name}{overload}"


def _aten(name: str) -> Any:
    parts = name.split(".")
    if len(parts) not in (2, 3) or not all(p.isidentifier() and not p.startswith("__") for p in parts[1:]) \
            or parts[1] in _DENIED_OPS:
        raise LoadError(f"the file calls {name!r}, which is not an aten op a saved explainer may call")
    try:
        found = getattr(torch.ops.aten, parts[1])
        found = getattr(found, parts[2]) if len(parts) == 3 else found
    except (AttributeError, RuntimeError):
        raise LoadError(f"the file calls {name!r}, which this torch ({torch.__version__}) does not have; convert "
                        "the model again with this torch") from None
    if not isinstance(found, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or _aten_name(found) != name:
        raise LoadError(f"the file calls {name!r}, which names an attribute of the aten namespace, not one of its ops")
    return found


# --- methods and attributes --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tensor_members():
    public = [name for name in dir(torch.Tensor) if not name.startswith("_")]
    methods = frozenset(n for n in public if callable(getattr(torch.Tensor, n)) and n not in _DENIED_METHODS)
    attributes = frozenset(n for n in public if not callable(getattr(torch.Tensor, n)) and n not in _DENIED_ATTRIBUTES)
    return methods, attributes


def method_allowed(name: Any, args: Sequence[Any]) -> bool:
    """Whether a graph may call method ``name`` on a value (``Tensor.type`` only with no string argument)."""
    if not isinstance(name, str) or name not in _tensor_members()[0]:
        return False
    return not (name == "type" and any(isinstance(a, str) for a in args))


def attribute_allowed(name: Any, fields: Sequence[str] = ()) -> bool:
    """Whether ``getattr(value, name)`` may be read: a tensor's data attributes (``shape``, ``dtype``, ...) or a
    field of the named result ``value`` is (``fields``: :func:`result_fields`)."""
    return isinstance(name, str) and (name in _tensor_members()[1] or (name in fields and not name.startswith("_")))


def result_fields(node: Any) -> Sequence[str]:
    """The fields of the named tuple a graph node gives: a named tuple the graph builds, or torch's named result
    of an op (``max(...).values``, ``topk(...).indices``: ``torch.return_types``); none for anything else, so
    that a field name never reads another object's attribute (a module's method, say)."""
    op, target = getattr(node, "op", None), getattr(node, "target", None)
    if op == "call_function" and isinstance(target, type) and hasattr(target, "_fields"):
        return tuple(target._fields)
    if op == "call_method" and isinstance(target, str):
        return _return_fields(target)
    name = function_name(target) if op == "call_function" else None
    if name is None or not name.startswith(("torch.", "aten.")) or name.startswith("torch.nn."):
        return ()
    return _return_fields(name.split(".")[1])


def _return_fields(op_name: str) -> Sequence[str]:
    result = getattr(torch.return_types, op_name, None)
    return tuple(getattr(result, "__match_args__", ())) if isinstance(result, type) else ()


# --- module classes --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _module_classes() -> Dict[str, type]:
    classes = {_class_name(nn.Module): nn.Module, SLOT_CLASS: ops.RuleSlot}
    for module in _nn_module_files():
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__.startswith("torch.nn.modules."):
                classes[_class_name(value)] = value
    classes.update({_class_name(cls): cls for cls in default_leaf_modules()})
    return classes


def _nn_module_files():
    package = torch.nn.modules
    names = [info.name for info in pkgutil.iter_modules(package.__path__)]
    return [getattr(package, name) for name in names if hasattr(package, name)]


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_class_name(cls: type) -> Optional[str]:
    """The allow-list name of a module class, or None (a module of that class then needs trust)."""
    name = _class_name(cls)
    return name if _module_classes().get(name) is cls else None


def module_class(name: str) -> type:
    """The allowed module class a saved explainer names; :class:`LoadError` for any other name."""
    found = _module_classes().get(name) if isinstance(name, str) else None
    if found is None:
        raise LoadError(f"the file holds a module of class {name!r}, which is not among the classes a saved "
                        "explainer may rebuild (torch.nn, torchvision's leaf ops modules, guided_swap's own)")
    return found


# --- constants -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _constants() -> Dict[str, Any]:
    kinds = (torch.dtype, torch.memory_format, torch.layout)
    return {str(value): value for value in vars(torch).values() if isinstance(value, kinds)}


def constant(name: str) -> Any:
    """A dtype, memory format or layout by its name (``"torch.float32"``)."""
    found = _constants().get(name) if isinstance(name, str) else None
    if found is None:
        raise LoadError(f"the file names {name!r}, which is not a torch dtype, memory format or layout")
    return found
