"""Atomic file writes: a crash, Ctrl-C or SIGKILL never leaves half a file under a name a user would read.

The temporary is a hidden sibling, ``.NAME.PID-TOKEN.part`` (plus ``suffix`` for writers that pick a format
from the file name), so no ``*.npz``/``*.png``/``*.pt2`` glob matches it. It is created with mode 0o666 and the
process umask, like any file a program opens for writing, and renamed over ``path`` in one step once complete.
Temporaries left by a killed process are removed the next time the same path is written
(:func:`atomic_write`) or a whole results folder is cleaned (:func:`remove_stale_parts`).

>>> import os, tempfile
>>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
>>> with atomic_write(target) as temporary:
...     _ = open(temporary, "w").write("done")
>>> open(target).read(), os.listdir(os.path.dirname(target))
('done', ['a.txt'])
"""
import errno
import os
import re
import secrets
from contextlib import contextmanager
from typing import Iterator, List

PART_EXTRA = len(".") + len(".") + 10 + len("-") + 8 + len(".part")
"""The bytes a temporary's name adds to the name it stands for (a process id of up to 10 digits), ``suffix`` aside."""

_PART = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.part(\.[A-Za-z0-9]+)?$")


def part_name(path: str, suffix: str = "") -> str:
    """A fresh hidden temporary name beside ``path``.

    >>> import re
    >>> bool(re.fullmatch(r"/out/\\.cat\\.png\\.npz\\.\\d+-[0-9a-f]{8}\\.part", part_name("/out/cat.png.npz")))
    True
    """
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.part{suffix}")


def is_part(name: str) -> bool:
    """Whether a file name is one of this module's temporaries."""
    return _PART.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM and not _a_zombie(pid)  # exists, owned by someone else
    return not _a_zombie(pid)


def _a_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped: a killed run's writer is orphaned, and where process 1
    of a container reaps no orphans it stays a zombie that ``os.kill(pid, 0)`` still finds (Linux's /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[:1] in ([b"Z"], [b"X"])
    except OSError:  # no /proc (macOS): the signal's answer stands
        return False


def remove_if_present(path: str) -> bool:
    """Remove ``path``; False when it was already gone."""
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


def remove_stale_parts(folder: str, recursive: bool = True, only_dead: bool = False) -> List[str]:
    """Remove temporaries under ``folder`` (those of dead processes on this host only, if ``only_dead``).

    Returns the paths removed. Call it before a run starts writing: with ``only_dead=False`` it also removes
    the temporaries of a run still writing into the same folder.
    """
    removed = []
    for root, dirs, files in os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]:
        for file in files:
            match = _PART.match(file)
            if match and not (only_dead and _alive(int(match["pid"]))):
                path = os.path.join(root, file)
                if remove_if_present(path):
                    removed.append(path)
    return removed


def _create(path: str, suffix: str) -> str:
    for _ in range(100):
        temporary = part_name(path, suffix)
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode & ~umask
            return temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path!r}")


def _remove_stale_siblings(path: str) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    for file in os.listdir(directory):
        match = _PART.match(file)
        if match and match["name"] == name and not _alive(int(match["pid"])):
            remove_if_present(os.path.join(directory, file))


@contextmanager
def atomic_write(path: str, suffix: str = "", clean: bool = True) -> Iterator[str]:
    """Yield a hidden temporary path beside ``path``; on success it replaces ``path`` in one step.

    ``suffix`` ends the temporary's name, for writers that choose a format by extension (``".pt2"``); writers
    that take a stream or an explicit format need none. ``clean`` first removes temporaries of ``path`` left
    by processes that no longer run (one directory listing; pass False when writing many files in a folder
    cleaned once with :func:`remove_stale_parts`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if clean:
        _remove_stale_siblings(path)
    temporary = _create(path, suffix)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        remove_if_present(temporary)
