"""Several inputs and fixed forward arguments: what a model is called with when it is not one tensor.

``ex.explain((x1, x2), forward_args=(mask, 0.5))`` calls the model as ``model(x1, x2, mask, 0.5)``. The tensors
of the tuple are *explained*: each gets its own input gradient (Captum's tuple of inputs). The forward arguments
are passed as they are and get no gradient (Captum's ``additional_forward_args``); a tensor among them whose
first dimension is the batch size is taken as one row per sample wherever samples are picked or repeated
(SmoothGrad's noisy copies), any other value is passed whole.

An :class:`Inputs` carries such a call through the capture paths; a plain tensor (or a detector's list of
images) stays what it is. :func:`call_signature` is what a graph is traced for: how many inputs, and which
forward arguments are tensors (graph inputs) or values (fixed in the graph).

>>> import torch
>>> call = Inputs((torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4)), (torch.ones(2, 5), 0.5))
>>> call.batch, len(call.args), call_signature(call)
(2, 4, Signature(inputs=2, extra=('tensor', ('value', 0.5))))
>>> call.rows(torch.tensor([1])).extra[0].shape
torch.Size([1, 5])
"""
from typing import Any, List, NamedTuple, Sequence, Tuple

from torch import Tensor

#: How a tensor forward argument appears in a :class:`Signature` (a value appears as ``("value", value)``).
TENSOR = "tensor"


class Signature(NamedTuple):
    """What a graph is traced for: the number of explained inputs, and per forward argument ``"tensor"`` (a
    graph input) or ``("value", v)`` (traced as that value)."""

    inputs: int = 1
    extra: Tuple[Any, ...] = ()

    def describe(self) -> str:
        """``"2 inputs, forward_args (tensor, 0.5)"`` for messages."""
        text = f"{self.inputs} input{'s' if self.inputs != 1 else ''}"
        if self.extra:
            text += ", forward_args (" + ", ".join(TENSOR if e == TENSOR else repr(e[1]) for e in self.extra) + ")"
        return text


class Inputs(NamedTuple):
    """A model call: the explained input tensors, then the forward arguments passed as they are."""

    tensors: Tuple[Tensor, ...]
    extra: Tuple[Any, ...] = ()

    @property
    def args(self) -> Tuple[Any, ...]:
        """The positional arguments of the model's forward."""
        return tuple(self.tensors) + tuple(self.extra)

    @property
    def batch(self) -> int:
        return self.tensors[0].shape[0]

    def rows(self, rows: Any) -> "Inputs":
        """The call for the samples ``rows`` (an index tensor or a slice) of every input and per-sample argument."""
        return self.with_tensors([t[rows] for t in self.tensors], rows)

    def with_tensors(self, tensors: Sequence[Tensor], rows: Any = None) -> "Inputs":
        """The same call with other input tensors; per-sample forward arguments taken at ``rows`` when given."""
        extra = self.extra if rows is None else tuple(_per_sample(value, self.batch, rows) for value in self.extra)
        return Inputs(tuple(tensors), extra)


def _per_sample(value: Any, batch: int, rows: Any) -> Any:
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
        return value[rows]
    return value


def call_signature(x: Any) -> Signature:
    """The :class:`Signature` of a call: one input for a tensor (or a detector's list of images)."""
    if not isinstance(x, Inputs):
        return Signature()
    return Signature(len(x.tensors), tuple(TENSOR if isinstance(v, Tensor) else ("value", v) for v in x.extra))


def same_signature(a: Signature, b: Signature) -> bool:
    """Whether two signatures are equal; values that cannot be compared count as different."""
    try:
        return bool(a == b)
    except Exception:  # a value whose == raises or is ambiguous (an array)
        return False


def input_tensors(x: Any) -> List[Tensor]:
    """The explained tensors of a call (a plain tensor is one)."""
    if isinstance(x, Inputs):
        return list(x.tensors)
    return [x] if isinstance(x, Tensor) else []


def model_args(x: Any) -> Tuple[Any, ...]:
    """The positional arguments the model is called with."""
    return x.args if isinstance(x, Inputs) else (x,)


def several(x: Any) -> bool:
    """Whether ``x`` is a call with several inputs or with forward arguments (not one plain input)."""
    return isinstance(x, Inputs)


def batch_size(x: Any) -> int:
    """The number of samples of a call, a tensor, or a detector's list of images."""
    if isinstance(x, Inputs):
        return x.batch
    return x.shape[0] if isinstance(x, Tensor) else len(x)


def first_rows(x: Any, count: int = 1) -> Any:
    """The first ``count`` samples of a call, detached (an example for resolving ``layer="auto"``)."""
    if isinstance(x, Inputs):
        return Inputs(tuple(t[:count].detach() for t in x.tensors), x.rows(slice(0, count)).extra)
    return x[:count].detach() if isinstance(x, Tensor) else x


def first_tensor(x: Any) -> Tensor:
    """The first explained tensor of a call (what sizes, ranks, devices and dtypes are read from when one is
    needed): the first input, or a detector's first image."""
    if isinstance(x, Inputs):
        return x.tensors[0]
    return x[0] if isinstance(x, (list, tuple)) else x


def cloned_args(x: Any) -> Tuple[Any, ...]:
    """The model's positional arguments with every tensor detached and cloned (a probe run changes nothing)."""
    return tuple(v.detach().clone() if isinstance(v, Tensor) else v for v in model_args(x))


def empty_args(x: Any, batch: int, device: Any) -> Tuple[Any, ...]:
    """The model's positional arguments as uninitialised tensors of ``batch`` samples on ``device`` (for a run on
    fake tensors); a forward argument that is not per sample keeps its shape."""
    def empty(value: Any, per_sample: bool) -> Any:
        if not isinstance(value, Tensor):
            return value
        shape = ((batch,) + tuple(value.shape[1:])) if per_sample else tuple(value.shape)
        return value.new_empty(shape, device=device)

    if not isinstance(x, Inputs):
        return (empty(x, True),)
    samples = x.batch
    return tuple(empty(t, True) for t in x.tensors) + tuple(
        empty(v, isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == samples) for v in x.extra)
