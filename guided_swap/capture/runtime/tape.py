"""One forward recorded call by call, for ``layer="auto"`` on the run-time path.

The run-time path has no graph, but while the model runs its ``TorchFunctionMode`` sees every torch call
(:mod:`guided_swap.capture.runtime.live_swap`). On the run that resolves ``layer="auto"`` each call that
returns tensors is kept as a :class:`Step`: its name (fx's naming), the function, the steps whose tensors it
read and what it returned; each module call as a :class:`ModuleCall`. That is enough of a data-flow graph to
find the global pooling and the map before it (:mod:`guided_swap.capture.runtime.auto`), as the graph paths do.

The tape keeps every tensor of that forward alive until it is dropped, so a tensor's ``id`` names one tensor
only; its version counter (``Tensor._version``) tells a value apart from the same tensor overwritten in place
later (DenseNet's ``F.relu(features, inplace=True)``).

>>> import torch
>>> x = torch.ones(1, 2, 4, 4)
>>> tape = Tape([x])
>>> y = torch.relu(x)
>>> tape.add("relu", torch.relu, (x,), {}, y, ())
>>> tape.steps[0].parents == frozenset({SOURCE}), tape.step_of(y)
(True, 0)
"""
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

SOURCE = -1  # a step's parent that is an explained input, not a step


@dataclass
class ModuleCall:
    """What one call of a module returned: its path, this call's name (``path``, then ``path_1``...), and
    the output's version counter when it returned (a later in-place op changes the value, not the object)."""

    path: str
    name: str
    module: nn.Module
    output: Any
    version: Optional[int] = None


@dataclass
class Step:
    """One torch call of the recorded forward that returned tensors."""

    name: str                     # the call's name, fx's way: ``layer4.1.add``, ``relu``, ``flatten``
    func: Any                     # the torch function or Tensor method called
    parents: FrozenSet[int]       # the steps whose tensors it read (SOURCE: an explained input)
    result: Any                   # what it returned
    tensors: Tuple[Tensor, ...]   # the tensors in it
    versions: Tuple[int, ...]     # their version counters just after the call
    scopes: Tuple[str, ...]       # the module paths around the call, outermost first
    own: bool = False             # an activation module's own call (named by the module, captured by it)

    @property
    def tensor(self) -> Optional[Tensor]:
        """The tensor it returned, when it returned exactly one (a split or a max returns several)."""
        return self.result if isinstance(self.result, Tensor) else None

    @property
    def op(self) -> str:
        """The function's name: ``adaptive_avg_pool2d``, ``mean``, ``conv2d``."""
        return str(getattr(self.func, "__name__", self.func))


class Tape:
    """The steps and module calls of one forward whose explained inputs are ``sources`` (module docstring)."""

    def __init__(self, sources: Sequence[Tensor]):
        self.steps: List[Step] = []
        self.calls: List[ModuleCall] = []
        self._made: Dict[int, Tuple[Tensor, int]] = {id(t): (t, SOURCE) for t in sources if isinstance(t, Tensor)}

    def step_of(self, tensor: Any) -> Optional[int]:
        """The step that last returned ``tensor`` (SOURCE for an explained input; None for a weight, a
        constant, or anything not a tensor of this forward)."""
        made = self._made.get(id(tensor)) if isinstance(tensor, Tensor) else None
        return made[1] if made is not None and made[0] is tensor else None

    def add(self, name: str, func: Any, args: tuple, kwargs: dict, result: Any, scopes: Tuple[str, ...],
            own: bool = False) -> None:
        """Keep the call ``func(*args, **kwargs) -> result`` when it returned tensors."""
        tensors = tuple(t for t in tree_leaves(result) if isinstance(t, Tensor))
        if not tensors:
            return
        parents = frozenset(p for p in map(self.step_of, tree_leaves((args, kwargs))) if p is not None)
        index = len(self.steps)
        self.steps.append(Step(name, func, parents, result, tensors, tuple(t._version for t in tensors), scopes, own))
        for tensor in tensors:
            self._made[id(tensor)] = (tensor, index)

    def module_call(self, path: str, name: str, module: nn.Module, output: Any) -> None:
        """Keep what one module call returned."""
        version = output._version if isinstance(output, Tensor) else None
        self.calls.append(ModuleCall(path, name, module, output, version))
