"""The modules a saved graph calls, as data: each module's class name, attributes, tensors and children.

A module of an allowed class (:func:`guided_swap.run.allowed.module_class`: torch.nn, torchvision's leaf ops
modules, guided_swap's ``RuleSlot``) with no hooks and attributes that are data (:mod:`guided_swap.run.file_values`)
is written as ``{"class", "state", "parameters", "buffers", "non_persistent", "children"}``. Loading makes an
instance without calling ``__init__`` and gives it that state through the class's own ``__setstate__``, as
unpickling does, but from data only: an attribute may not replace one of the class's methods or properties, a
function (from the allow-list, as ``TransformerEncoderLayer.activation`` holds one) only a public attribute.
Any other module is pickled (``{"pickled": key}``) and loads only with ``trust=True``.

>>> import torch
>>> from guided_swap.run.file_values import Packer
>>> packer = Packer(rule=None)
>>> key = pack_module(torch.nn.Conv2d(3, 4, 3, padding=1), packer)
>>> data = packer.modules[key]
>>> data["class"], data["state"]["padding"], data["parameters"]
('torch.nn.modules.conv.Conv2d', {'tuple': [1, 1]}, {'weight': 't0', 'bias': 't1'})
"""
from collections import OrderedDict
from typing import Any, Dict

from torch import nn

from ..core.errors import LoadError
from . import allowed
from .file_values import NotData, Packer, Unpacker, identifier_path, pack, plain_names, unpack

_OWN = ("training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_BOOKKEEPING = tuple(name for name in vars(nn.Module()) if name not in _OWN)  # hook tables: must be empty
_CALLED = ("_compiled_call_impl",)  # what nn.Module calls in place of forward when it is set


def pack_module(module: nn.Module, packer: Packer) -> str:
    """The key of ``module`` in ``packer.modules`` (written once however often it is used)."""
    key = packer._keys.get(id(module))
    if key is not None:
        return key
    key = packer._keys[id(module)] = f"m{len(packer.modules)}"
    packer.modules[key] = None  # reserved: a child refers back to it by key
    mark = packer.mark()
    try:
        packer.modules[key] = _module_data(module, packer)
    except NotData as why:
        packer.roll_back(mark)
        name = f"{type(module).__module__}.{type(module).__qualname__}"
        packer.modules[key] = {"pickled": packer.pickle(module, f"a module of class {name} ({why})")}
    return key


def _module_data(module: nn.Module, packer: Packer) -> Dict[str, Any]:
    name = allowed.module_class_name(type(module))
    if name is None:
        raise NotData("not a torch.nn or torchvision ops class")
    hooked = [hook for hook in _BOOKKEEPING if vars(module).get(hook)]
    if hooked:
        raise NotData(f"it has hooks: {', '.join(hooked)}")
    state = {k: pack(v, packer, functions=True) for k, v in vars(module).items() if k not in _OWN + _BOOKKEEPING}
    state["training"] = module.training
    return {"class": name, "state": state,
            "parameters": {n: None if p is None else packer.tensor(p) for n, p in module._parameters.items()},
            "buffers": {n: None if b is None else packer.tensor(b) for n, b in module._buffers.items()},
            "non_persistent": sorted(module._non_persistent_buffers_set),
            "children": {n: None if c is None else pack_module(c, packer) for n, c in module._modules.items()}}


class ModuleReader:
    """Rebuilds the modules of a file by key, each once (so a module used in two graphs stays one module)."""

    def __init__(self, table: Dict[str, Any], unpacker: Unpacker):
        if not isinstance(table, dict):
            raise LoadError("the file's module table is not a table: it is damaged or edited")
        self.table, self.unpacker = table, unpacker
        self._built: Dict[str, nn.Module] = {}
        self._building = set()
        unpacker.module = self

    def __call__(self, key: Any) -> nn.Module:
        if key in self._built:
            return self._built[key]
        if not isinstance(key, str) or key not in self.table or key in self._building:
            raise LoadError(f"the file refers to a module {key!r} that it does not hold: it is damaged or edited")
        self._building.add(key)
        data = self.table[key]
        module = self.unpacker.pickled(data["pickled"]) if set(data) == {"pickled"} else self._rebuilt(data)
        if not isinstance(module, nn.Module):
            raise LoadError(f"the file's module {key} is a {type(module).__name__}, not a module")
        self._built[key] = module
        return module

    def _rebuilt(self, data: Dict[str, Any]) -> nn.Module:
        cls = allowed.module_class(data["class"])
        state = {name: unpack(value, self.unpacker, functions=not name.startswith("_"))
                 for name, value in _attributes(cls, data["state"])}
        parameters = OrderedDict((n, self._tensor(k, True)) for n, k in _named(data["parameters"]))
        buffers = OrderedDict((n, self._tensor(k, False)) for n, k in _named(data["buffers"]))
        children = OrderedDict((n, None if k is None else self(k)) for n, k in _named(data["children"]))
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.__setstate__({**state, "_parameters": parameters, "_buffers": buffers, "_modules": children,
                             "_non_persistent_buffers_set": set(plain_names(data["non_persistent"]))})
        return module

    def _tensor(self, key: Any, parameter: bool):
        if key is None:
            return None
        tensor = self.unpacker.tensor(key)
        if isinstance(tensor, nn.Parameter) != parameter:
            raise LoadError(f"tensor {key} is {'not ' if parameter else ''}a parameter where the file's module needs "
                            f"{'one' if parameter else 'a buffer'}: it is damaged or edited")
        return tensor


def _named(table: Any):
    if not isinstance(table, dict) or not all(identifier_path(n) and "." not in n for n in table):
        raise LoadError(f"the file holds names {str(table)[:80]} that are not plain names: it is damaged or edited")
    return table.items()


def _attributes(cls: type, state: Any):
    """A module's attributes from a file: plain names that replace none of the class's methods or properties."""
    for name, value in _named(state):
        if name.startswith("_") and name in _OWN + _BOOKKEEPING + _CALLED:
            raise LoadError(f"the file sets {cls.__name__}.{name}, which guided_swap never writes: it is edited")
        member = getattr(cls, name, None)
        if callable(member) or isinstance(member, property):
            raise LoadError(f"the file sets {cls.__name__}.{name}, which would replace the class's own "
                            f"{'method' if callable(member) else 'property'}: the file is edited")
        yield name, value
