"""The library's own copy of a user's model: every capture path works on one, so the model is never touched.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
>>> copy_ = mirror(model)
>>> copy_[0] is model[0], copy_[0].weight is model[0].weight
(False, True)
"""
import copy
from typing import Any, Dict

from torch import nn


def mirror(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor with ``model``.

    Each module is copied, and so is every container (dict, list, set, and a tuple holding one) in its
    ``__dict__``, nested ones included: hook tables, parameter and buffer dicts, and the caches a model writes
    while it runs. So nothing done to the mirror (``.to()``, ``.eval()``, hooks, tracing a forward that stores
    an fx Proxy in ``self.cache``) can reach the user's module objects, while in-place weight updates to the
    model stay visible to it. Tensors are never copied; a module a container refers to is the mirror's copy.
    """
    modules: Dict[int, nn.Module] = {}

    def copy_module(module: nn.Module) -> None:
        if id(module) in modules:  # a module used in several places stays one module
            return
        modules[id(module)] = copy.copy(module)
        for sub in module._modules.values():
            if sub is not None:
                copy_module(sub)

    copy_module(model)
    copies: Dict[int, Any] = {}
    for clone in modules.values():
        for name, value in list(vars(clone).items()):
            clone.__dict__[name] = _own_containers(value, modules, copies)
    return modules[id(model)]


def _own_containers(value: Any, modules: Dict[int, nn.Module], copies: Dict[int, Any]) -> Any:
    """``value`` with every dict, list and set in it copied (once each, so sharing is kept) and every module
    of the tree replaced by its copy; tensors and other objects are kept as they are."""
    if isinstance(value, nn.Module):
        return modules.get(id(value), value)
    if not isinstance(value, (dict, list, set, tuple)):
        return value
    if id(value) in copies:
        return copies[id(value)]
    if isinstance(value, tuple):  # immutable: rebuilt only when something inside it was copied
        items = [_own_containers(item, modules, copies) for item in value]
        if all(new is old for new, old in zip(items, value)):
            copies[id(value)] = value
        else:
            copies[id(value)] = type(value)._make(items) if hasattr(value, "_fields") else type(value)(items)
        return copies[id(value)]
    clone = copies[id(value)] = copy.copy(value)
    if isinstance(value, dict):
        for key, item in value.items():
            new = _own_containers(item, modules, copies)
            if new is not item:
                clone[key] = new
    elif isinstance(value, list):
        items = [_own_containers(item, modules, copies) for item in value]
        if any(new is not old for new, old in zip(items, value)):
            clone[:] = items
    return clone
