"""How the command speaks: warnings as one line each, and child processes that leave Ctrl-C to the main one.

>>> import warnings
>>> with warnings_in_one_line():
...     print(warnings.formatwarning("careful", UserWarning, "f.py", 1), end="")
guided-swap: warning: UserWarning: careful
"""
import signal
import warnings
from contextlib import contextmanager

import torch


def _one_line(message, category, *_, **__) -> str:
    return f"guided-swap: warning: {category.__name__}: {message}\n"


def one_line_warnings() -> None:
    """Show warnings as one line each: ``guided-swap: warning: Category: message``."""
    warnings.formatwarning = _one_line


@contextmanager
def warnings_in_one_line():
    """:func:`one_line_warnings` while inside (the command line's ``main``, also when called in-process)."""
    previous = warnings.formatwarning
    one_line_warnings()
    try:
        yield
    finally:
        warnings.formatwarning = previous


def quiet_child(*_) -> None:
    """Set-up of a decode or write worker: Ctrl-C is the main process's to handle (it stops after the batch
    and then ends its workers), one torch thread, one-line warnings."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    one_line_warnings()
