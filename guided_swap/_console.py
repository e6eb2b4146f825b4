"""How the command speaks: warnings as one line each, and child processes that leave Ctrl-C to the main one.

>>> import warnings
>>> with warnings_in_one_line():
...     print(warnings.formatwarning("careful", UserWarning, "f.py", 1), end="")
guided-swap: warning: UserWarning: careful
"""
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager

import torch

from .media.viz import printable


def _one_line(message, category, *_, **__) -> str:
    return f"guided-swap: warning: {category.__name__}: {printable(message)}\n"  # a file name may hold a newline


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


PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_SECONDS = 0.5


def _parent_death_signal(number: int) -> bool:
    """Ask Linux to send this process ``number`` when its parent ends (prctl PR_SET_PDEATHSIG); False where
    that is not available (another OS, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, number, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # the parent ended and this process was handed to another
            os._exit(1)
        time.sleep(WATCH_SECONDS)


def tied_child(parent: int) -> None:
    """Set-up of a writer process forked from ``parent``: as :func:`quiet_child`, and it ends with its parent
    (SIGKILL on the parent's death where Linux offers it, and a thread that watches ``os.getppid()`` everywhere,
    within :data:`WATCH_SECONDS`), and SIGTERM ends it (a fork inherits the parent's stop-after-the-batch
    handler, under which it would ignore SIGTERM)."""
    quiet_child()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the signal was asked for
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
