"""The model's own hooks: which a graph holds, and which a graph would silently drop.

A graph capture runs a graph, not the model's modules, so a hook counts only if tracing put what it does into
the graph: a forward hook or pre-hook that *returns* a value, called while tracing, is traced like the rest of
the forward (and so is honoured exactly at every ``explain``). Every other hook would be dropped: one that
only has side effects (it stores, logs or counts, and returns None) runs once while tracing and never again; one
on a module the tracer keeps as a single call (a leaf such as ``nn.Conv2d``, or an ``nn.ReLU`` the rule
replaces) is not called while tracing; a backward hook never enters a forward graph. Rather than drop them,
the graph paths refuse the model (:func:`dropped_hooks`), naming each hook; ``capture="auto"`` then falls back
to the run-time capture, which runs the model's own modules and so calls every hook as the model would.

Hooks are read when the model is converted: the explainer works on its own copy of the model, so a hook added to
(or removed from) the model afterwards does not reach it.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
>>> handle = model[0].register_forward_hook(lambda module, inputs, output: None)
>>> [hook.describe() for hook in find_hooks(model)]  # doctest: +ELLIPSIS
['forward hook <lambda> on module 0']
>>> handle.remove()
"""
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

from torch import nn
from torch.nn.modules import module as torch_module

from ..core.errors import TraceError

_TABLES = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
           ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_GLOBAL = (("_global_forward_pre_hooks", "global forward pre-hook"), ("_global_forward_hooks", "global forward hook"),
           ("_global_backward_pre_hooks", "global backward pre-hook"),
           ("_global_backward_hooks", "global backward hook"))
_TRACEABLE = ("_forward_pre_hooks", "_forward_hooks")


@dataclass(frozen=True)
class Hook:
    """One hook on a module (``module`` its qualified name, ``""`` the model itself; None: a global hook)."""

    module: Any
    kind: str
    function: str
    called: bool = False  # while tracing (then it returned None: a side-effect hook)

    def describe(self) -> str:
        where = "every module (torch.nn.modules.module)" if self.module is None else (
            f"module {self.module}" if self.module else "the model")
        return f"{self.kind} {self.function} on {where}"


def find_hooks(model: nn.Module) -> List[Hook]:
    """Every hook registered on ``model``'s modules, and the global module hooks."""
    found = [Hook(None, kind, _name(hook)) for table, kind in _GLOBAL
             for hook in getattr(torch_module, table, {}).values()]
    for name, module in model.named_modules(remove_duplicate=True):
        for table, kind in _TABLES:
            found.extend(Hook(name, kind, _name(hook)) for hook in getattr(module, table, {}).values())
    return found


class HookRecorder:
    """Wraps the forward hooks and pre-hooks of a mirror of the model (never the model's own) so that tracing
    records which of them returned a value; :meth:`dropped` lists every other hook."""

    def __init__(self, root: nn.Module):
        self._root = root
        self._returned: Dict[Tuple[str, str, int], bool] = {}
        for name, module in root.named_modules(remove_duplicate=True):
            for table in _TRACEABLE:
                hooks = getattr(module, table)
                for key, hook in list(hooks.items()):
                    hooks[key] = self._wrapped(hook, (name, table, key))

    def _wrapped(self, hook: Callable, where: Tuple[str, str, int]) -> Callable:
        def recorded(*args, **kwargs):
            result = hook(*args, **kwargs)
            self._returned[where] = self._returned.get(where, False) or result is not None
            return result
        recorded.__wrapped__ = hook
        return recorded

    def dropped(self) -> List[Hook]:
        """The hooks the traced graph does not hold (module docstring)."""
        missing = [Hook(None, kind, _name(hook)) for table, kind in _GLOBAL
                   for hook in getattr(torch_module, table, {}).values()]
        for name, module in self._root.named_modules(remove_duplicate=True):
            for table, kind in _TABLES:
                for key, hook in getattr(module, table).items():
                    returned = self._returned.get((name, table, key))
                    if table not in _TRACEABLE or not returned:
                        missing.append(Hook(name, kind, _name(hook), called=returned is not None))
        return missing

    def remove(self) -> None:
        """Take every hook off the mirror: what tracing kept is in the graph, and a leaf module's hook must not
        run again when the graph calls the module."""
        for module in self._root.modules():
            for table, _ in _TABLES:
                getattr(module, table).clear()
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                if hasattr(module, extra):
                    getattr(module, extra).clear()


class DroppedHooks(TraceError):
    """A graph capture refused a model whose hooks it would not run; ``short`` says so in one line (the report's
    reason when ``capture="auto"`` falls back to the run-time capture)."""

    def __init__(self, message: str, short: str, hooks: Sequence[Hook]):
        super().__init__(message)
        self.short, self.hooks = short, tuple(hooks)

    @property
    def another_graph_could_hold(self) -> bool:
        """Whether every hook dropped is a forward hook that tracing never called (on a module fx keeps as one
        call): torch.export, which traces into every module, may still hold them."""
        return all(hook.module is not None and "forward" in hook.kind and not hook.called for hook in self.hooks)


def unpicklable_hooks(model: nn.Module) -> List[Hook]:
    """The hooks on ``model``'s modules that pickle cannot save (a lambda, a function defined in a function)."""
    bad = []
    for name, module in model.named_modules(remove_duplicate=True):
        for table, kind in _TABLES:
            for hook in getattr(module, table, {}).values():
                try:
                    pickle.dumps(hook)
                except Exception:  # pickle raises PicklingError, AttributeError or TypeError here
                    bad.append(Hook(name, kind, _name(hook)))
    return bad


def listed(hooks: Sequence[Hook], most: int = 6) -> str:
    """The hooks described, the first ``most`` of them."""
    text = "; ".join(hook.describe() for hook in hooks[:most])
    return text + (f"; and {len(hooks) - most} more" if len(hooks) > most else "")


def refuse_dropped(hooks: Sequence[Hook], path: str) -> None:
    """A :class:`DroppedHooks` naming the hooks a graph capture would drop; nothing when there are none."""
    if not hooks:
        return
    raise DroppedHooks(
        f"the {path} capture would not run the model's hook(s): {listed(hooks)}. A graph holds a hook only when it "
        "returns a value while the model is traced; side-effect hooks, hooks on modules traced as one call and "
        "backward hooks would be silently skipped at every explain.\n  hint: convert(..., capture='runtime') runs "
        "the model's own modules and calls every hook as the model does (capture='auto' falls back to it), or "
        "remove the hooks (handle.remove()) before convert",
        f"{path} would skip the model's hook(s) ({listed(hooks, 2)})", hooks)


def _name(hook: Any) -> str:
    hook = getattr(hook, "__wrapped__", hook)
    return getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or type(hook).__name__
