"""Exception classes. Every error a user can cause is one of these (or a plain ValueError/TypeError)."""


class GuidedSwapError(Exception):
    """Base class of the library's own errors."""


class TraceError(GuidedSwapError, RuntimeError):
    """torch.fx could not trace the model; the message names the failing line and the tracer options to try."""


class LayerError(GuidedSwapError, ValueError):
    """A layer name that is not in the model, or a layer that cannot be captured as asked."""


class TargetError(GuidedSwapError, ValueError):
    """A target that does not fit the model's output or the batch."""


class InputError(GuidedSwapError, ValueError):
    """An input tensor of the wrong rank, channel count, device, or with NaN/Inf values."""
