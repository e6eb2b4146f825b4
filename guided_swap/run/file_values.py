"""Values in a saved explainer as JSON data: what the graph's arguments and the modules' attributes hold.

:func:`pack` writes a value as JSON: numbers, strings, ``None`` and booleans as they are; tuples, lists, dicts,
sets, slices, ``torch.Size``, named tuples, dtypes and devices tagged (``{"tuple": [...]}``); tensors by a key
into the file's tensors; graph nodes by name; allowed functions by their allow-list name
(:mod:`guided_swap.run.allowed`). Anything else raises :class:`NotData`, and the thing holding it is pickled
instead (it then needs ``trust=True`` to load). :func:`unpack` reads only these forms back; an unknown tag, a
function outside the allow-list or a tensor key the file does not have raises :class:`LoadError`.

:class:`Packer` collects, while a file is written, the tensors (once each, by identity), the modules and the
objects that must be pickled, each with the reason it needs trust; :class:`Unpacker` gives them back on load.

>>> import torch
>>> packer = Packer(rule=None)
>>> data = pack((1, 2.5, "same", slice(None, 2), torch.float16, {"k": [None, True]}), packer)
>>> data["tuple"][3], data["tuple"][4]
({'slice': [None, 2, None]}, {'constant': 'torch.float16'})
>>> unpack(data, Unpacker({}, {}, None, None))
(1, 2.5, 'same', slice(None, 2, None), torch.float16, {'k': [None, True]})
"""
import collections
import functools
import keyword
import re
import unicodedata
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, fx, nn

from ..capture.graph.plan import GraphOutputs
from ..core.errors import LoadError
from ..core.rules import Rule
from . import allowed

_PLAIN = (type(None), bool, int, float, str)
_TAGS = frozenset({"node", "tensor", "tuple", "list", "dict", "set", "slice", "ellipsis", "constant", "device",
                   "size", "namedtuple", "function", "rule", "complex"})


class NotData(Exception):
    """A value that a saved explainer cannot hold as data (it must be pickled instead)."""


class Packer:
    """What a file being written holds besides JSON: tensors, modules, pickled objects (module docstring)."""

    def __init__(self, rule: Optional[Rule]):
        self.rule = rule
        self.tensors: Dict[str, Tensor] = {}
        self.tensor_info: Dict[str, dict] = {}
        self.modules: Dict[str, Any] = {}
        self.pickled: Dict[str, Any] = {}
        self.needs: Dict[str, str] = {}  # pickled key -> why it needs trust
        self._keys: Dict[int, str] = {}

    def tensor(self, t: Tensor) -> str:
        """The key of ``t`` in the file's tensors (one entry per tensor object)."""
        key = self._keys.get(id(t))
        if key is None:
            key = self._keys[id(t)] = f"t{len(self.tensors)}"
            self.tensors[key] = t
            self.tensor_info[key] = _tensor_info(t)
        return key

    def pickle(self, obj: Any, why: str) -> str:
        """The key of ``obj`` among the objects written as a pickle; ``why`` says what needs trust to load."""
        key = f"p{len(self.pickled)}"
        self.pickled[key], self.needs[key] = obj, why
        return key

    def mark(self) -> Tuple[int, int, int]:
        """A point to :meth:`roll_back` to when packing something fails halfway."""
        return len(self.tensors), len(self.modules), len(self.pickled)

    def roll_back(self, mark: Tuple[int, int, int]) -> None:
        for table, size in zip((self.tensors, self.modules, self.pickled), mark):
            for key in list(table)[size:]:
                del table[key]
                self.tensor_info.pop(key, None)
                self.needs.pop(key, None)
        kept = set(self.tensors) | set(self.modules)
        self._keys = {i: k for i, k in self._keys.items() if k in kept}


def _tensor_info(t: Tensor) -> dict:
    layout = next((name for name, fmt in (("torch.channels_last", torch.channels_last),
                                          ("torch.channels_last_3d", torch.channels_last_3d))
                   if t.dim() in (4, 5) and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)), None)
    return {"dtype": str(t.dtype), "shape": list(t.shape), "device": str(t.device), "memory_format": layout,
            "parameter": isinstance(t, nn.Parameter), "requires_grad": bool(t.requires_grad)}


class Unpacker:
    """What a file being read holds besides JSON: its tensors (checked against their description), its modules
    (rebuilt once each), and its pickled objects, which are there only when the caller trusts the file."""

    def __init__(self, tensor_info: Dict[str, dict], raw: Dict[str, Tensor], pickled: Optional[Dict[str, Any]],
                 rule: Optional[Rule], map_location: Any = None, needs: Optional[Dict[str, str]] = None,
                 module: Optional[Callable[[str], nn.Module]] = None):
        self.tensor_info, self.raw, self.rule, self.map_location = tensor_info, raw, rule, map_location
        self._pickled, self.needs = pickled, dict(needs or {})
        self.module = module
        self._tensors: Dict[str, Tensor] = {}

    def tensor(self, key: Any) -> Tensor:
        if key not in self._tensors:
            if not isinstance(key, str) or key not in self.tensor_info or key not in self.raw:
                raise LoadError(f"the file refers to a tensor {key!r} that it does not hold: it is damaged or edited")
            self._tensors[key] = _rebuilt(key, self.raw[key], self.tensor_info[key], self.map_location)
        return self._tensors[key]

    def pickled(self, key: Any) -> Any:
        """A pickled object; without trust, a :class:`LoadError` saying what in the file needs it."""
        if not isinstance(key, str) or key not in self.needs:
            raise LoadError(f"the file refers to a pickled object {key!r} that it does not hold: damaged or edited")
        if self._pickled is None:
            raise LoadError(needs_trust_message(self.needs.values(), self.needs[key]))
        if key not in self._pickled:
            raise LoadError(f"the file's pickled objects lack {key!r}: it is damaged or edited")
        return self._pickled[key]


def needs_trust_message(needs, first: Optional[str] = None) -> str:
    """Why a file loads only with ``trust=True``, and how to opt in."""
    listed = "; ".join(dict.fromkeys(needs))
    return (f"this file holds objects that only unpickling can rebuild ({listed}), and unpickling runs code from "
            f"the file{f' (first needed: {first})' if first else ''}. If you trust where it came from, load it with "
            "gs.load(path, trust=True); otherwise ask for a file saved without them")


def _rebuilt(key: str, raw: Tensor, info: dict, map_location: Any) -> Tensor:
    if not isinstance(info, dict) or str(raw.dtype) != info.get("dtype") or list(raw.shape) != info.get("shape"):
        raise LoadError(f"tensor {key} is {raw.dtype} {tuple(raw.shape)} in the file, but the explainer's "
                        f"description says {info.get('dtype') if isinstance(info, dict) else info} "
                        f"{info.get('shape') if isinstance(info, dict) else ''}: the file is damaged or edited")
    t = raw.to(device_for(info.get("device"), map_location))
    if info.get("memory_format"):
        t = t.contiguous(memory_format=allowed.constant(info["memory_format"]))
    if info.get("parameter"):
        return nn.Parameter(t, requires_grad=bool(info.get("requires_grad")))
    return t.requires_grad_(True) if info.get("requires_grad") else t


def device_for(saved: Any, map_location: Any) -> torch.device:
    """Where a tensor saved on ``saved`` goes: ``map_location`` (a device, its name, or a dict of names) or back
    where it was."""
    if not isinstance(saved, str):
        raise LoadError(f"the file names a device {saved!r}: it is damaged or edited")
    if isinstance(map_location, dict):
        map_location = map_location.get(saved, saved)
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError("map_location takes a device, a device name, or a dict from saved device names to new ones "
                        f"(a callable only with trust=True on a pickled file); got {type(map_location).__name__}")
    try:
        device = torch.device(map_location if map_location is not None else saved)
    except RuntimeError:
        raise LoadError(f"the file names a device {saved!r} that torch does not know") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"the explainer was saved on {saved}, and CUDA is not available here: load it with "
                        "map_location='cpu'")
    return device


# --- values --------------------------------------------------------------------------------------------------

def pack(value: Any, packer: Packer, node: Optional[Callable[[fx.Node], str]] = None,
         functions: bool = False) -> Any:
    """``value`` as JSON data (module docstring); ``node`` names graph nodes, ``functions`` allows function values."""
    if type(value) in _PLAIN:
        return value
    again = functools.partial(pack, packer=packer, node=node, functions=functions)
    if isinstance(value, fx.Node) and node is not None:
        return {"node": node(value)}
    if isinstance(value, Tensor):
        return {"tensor": packer.tensor(value)}
    if isinstance(value, Rule) and value is packer.rule:
        return {"rule": True}
    if isinstance(value, torch.Size):
        return {"size": [again(v) for v in value]}
    return _pack_container(value, again) or _pack_scalar(value, functions)


def _pack_container(value: Any, again: Callable) -> Optional[dict]:
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return {"namedtuple": [type(value).__name__, list(type(value)._fields)], "items": [again(v) for v in value]}
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list, fx.immutable_collections.immutable_list):
        return {"tuple" if type(value) is tuple else "list": [again(v) for v in value]}
    if type(value) in (dict, collections.OrderedDict, fx.immutable_collections.immutable_dict):
        return {"dict": [[again(k), again(v)] for k, v in value.items()]}
    if type(value) in (set, frozenset):
        return {"set": [again(v) for v in value]}
    if isinstance(value, slice):
        return {"slice": [again(value.start), again(value.stop), again(value.step)]}
    return None


def _pack_scalar(value: Any, functions: bool) -> dict:
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
        return {"constant": str(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if type(value) is complex:
        return {"complex": [value.real, value.imag]}
    name = allowed.function_name(value) if functions and callable(value) else None
    if name is not None:
        return {"function": name}
    raise NotData(f"a value of type {type(value).__module__}.{type(value).__qualname__}")


def unpack(data: Any, unpacker: Unpacker, node: Optional[Callable[[Any], fx.Node]] = None,
           functions: bool = False) -> Any:
    """The value :func:`pack` wrote; :class:`LoadError` for anything it does not write."""
    if type(data) in _PLAIN:
        return data
    again = functools.partial(unpack, unpacker=unpacker, node=node, functions=functions)
    if type(data) is not dict or not data or not set(data) <= _TAGS | {"items"}:
        raise LoadError(f"the file holds a value {str(data)[:80]!r} that is not one guided_swap writes: it is "
                        "damaged or edited")
    tag = next(k for k in data if k != "items")
    value = data[tag]
    if tag == "node" and node is not None:
        return node(value)
    if tag == "tensor":
        return unpacker.tensor(value)
    if tag == "rule" and unpacker.rule is not None:
        return unpacker.rule
    if tag == "function" and functions:
        return allowed.function(value)
    return _unpack_tagged(tag, value, data, again)


def _unpack_tagged(tag: str, value: Any, data: dict, again: Callable) -> Any:
    if tag in ("tuple", "list", "set", "size", "slice", "complex", "namedtuple") and type(value) is not list:
        raise LoadError(f"the file holds a {tag} that is not a list: it is damaged or edited")
    if tag in ("tuple", "list", "set", "size"):
        items = [again(v) for v in value]
        return {"tuple": tuple, "list": list, "set": set, "size": torch.Size}[tag](items)
    if tag == "dict" and type(value) is list and all(type(p) is list and len(p) == 2 for p in value):
        return {again(k): again(v) for k, v in value}
    if tag == "slice" and len(value) == 3:
        return slice(*(again(v) for v in value))
    if tag == "namedtuple" and len(value) == 2 and type(data.get("items")) is list:
        return named_tuple(*value)(*(again(v) for v in data["items"]))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "constant":
        return allowed.constant(value)
    if tag == "device" and isinstance(value, str):
        return _device(value)
    if tag == "complex" and len(value) == 2 and all(type(v) in (int, float) for v in value):
        return complex(*value)
    raise LoadError(f"the file holds a {tag!r} value {str(value)[:80]!r} that guided_swap does not write here: it is "
                    "damaged or edited")


def _device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise LoadError(f"the file names a device {name!r} that torch does not know") from None


@functools.lru_cache(maxsize=256)
def _named_tuple(name: str, fields: Tuple[str, ...]) -> type:
    if name == "GraphOutputs" and fields == GraphOutputs._fields:
        return GraphOutputs
    return collections.namedtuple(name, fields, module=__name__)


def named_tuple(name: Any, fields: Any) -> type:
    """The named-tuple class a file describes by name and fields: guided_swap's ``GraphOutputs``, else a new class
    with that name and those fields (no class is imported)."""
    if not (identifier_path(name) and "." not in name) or type(fields) is not list or not all(_identifier(f) for f in fields) \
            or len(set(fields)) != len(fields):
        raise LoadError(f"the file describes a named tuple {str(name)[:40]!r} with fields {str(fields)[:80]} that are "
                        "not plain names: it is damaged or edited")
    return _named_tuple(name, tuple(fields))


def _identifier(name: Any) -> bool:
    return as_written(name) and not name.startswith("_") and not keyword.iskeyword(name)


def identifier_path(target: Any) -> bool:
    """Whether ``target`` is a dotted path of plain names or indices (``layer4.1.conv1``): what a graph may
    address, and what the code torch.fx generates from it writes as it is."""
    return isinstance(target, str) and all(
        re.fullmatch(r"[0-9]+", p) or (as_written(p) and not p.startswith("__") and not keyword.iskeyword(p))
        for p in target.split("."))


def as_written(name: Any) -> bool:
    """Whether ``name`` is an identifier that Python's parser keeps as it is: the parser NFKC-normalises the names
    in code, so ``self.\uff43onv`` in generated code reads ``self.conv``, another attribute than the graph names."""
    return isinstance(name, str) and name.isidentifier() and unicodedata.normalize("NFKC", name) == name


def plain_names(names: Any) -> List[str]:
    """``names`` (a list from a file) checked to be plain names or indices; :class:`LoadError` otherwise."""
    if type(names) is not list or not all(identifier_path(n) and "." not in n for n in names):
        raise LoadError(f"the file lists names {str(names)[:80]} that are not plain names: it is damaged or edited")
    return names
