"""Atomic file writes: a crash or Ctrl-C never leaves half a file under the final name."""
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_write(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` in one step.

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_write(target) as temporary:
    ...     _ = open(temporary, "w").write("done")
    >>> open(target).read()
    'done'
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=suffix)
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
