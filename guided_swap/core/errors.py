"""Every exception the library raises on purpose: one base class, one class per kind of failure.

Each also derives from the built-in type a caller would expect (ValueError, TypeError, RuntimeError), so
``except ValueError`` keeps working.

>>> import guided_swap as gs
>>> issubclass(gs.LayerError, gs.GuidedSwapError) and issubclass(gs.LayerError, ValueError)
True
"""


class GuidedSwapError(Exception):
    """Base class of the library's own errors."""


class TraceError(GuidedSwapError, RuntimeError):
    """The model could not be captured as a graph; the message names the failing line and what to try."""


class LayerError(GuidedSwapError, ValueError):
    """A layer name that is not in the model, or a layer that cannot be captured as asked."""


class TargetError(GuidedSwapError, ValueError):
    """A target that does not fit the model's output or the batch."""


class InputError(GuidedSwapError, ValueError):
    """An input tensor of the wrong rank, channel count, device, or with NaN/Inf values."""


class OutputError(GuidedSwapError, ValueError, TypeError):
    """An ``output=`` entry that the model's output does not have, or a missing one for a multi-output model."""


class RuleError(GuidedSwapError, ValueError):
    """A backprop rule that is not registered, is malformed, or cannot be saved."""


class LoadError(GuidedSwapError, ValueError):
    """A file that is not a guided_swap explainer, is damaged, or was written by an incompatible version."""


class ExportError(GuidedSwapError, RuntimeError):
    """The explainer could not be exported as a static program; nothing was written."""


class CommandError(GuidedSwapError):
    """A usage error on the command line: printed as one line, exit status 2."""


class RunError(GuidedSwapError, RuntimeError):
    """A folder run (``guided-swap explain``) stopped by an error after it began writing: printed as one line, exit
    status 1; what was written stays, and the same command finishes the job."""


class ZeroGradientWarning(UserWarning):
    """A gradient is zero everywhere for some samples, so the maps made from it show nothing."""
