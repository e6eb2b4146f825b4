"""A results folder: where each input's outputs go, what each result records, which are done, the index.

Layout (``OUT`` is ``--out``):

- Inputs are found under the folders given (recursively, sorted; hidden files and folders skipped, links to
  folders not followed) and named by their path relative to the deepest folder holding every input, so the
  names never collide: ``photos/sub/pic.jpg`` explained with ``photos/`` gives ``OUT/sub/pic.jpg.npz`` and
  ``OUT/sub/pic.jpg.png`` (the input's whole file name, extension included, plus the output's). A name too long
  for OUT's file system, or whose result would be a folder other results go in, is :func:`tagged`
  (:func:`output_names`); the index maps each input to its name.
- An input that cannot be explained (a link to nothing, a named pipe, a blocked result path) is planned as
  failed, with a one-line reason (:attr:`Plan.failed`); the others go on.
- ``OUT`` holds a hidden marker file, ``.guided-swap``; a folder with one is never searched for inputs.
- ``OUT`` may not be an input folder, nor hold one (nor the folder of an input file).
- Every ``.npz`` and ``.png`` carries its *record* (a JSON string; in the ``.npz`` as ``record``, in the PNG
  as the text chunk ``guided-swap record``): the input, the outputs, the target and its score, the top-5
  classes, the Grad-CAM peak, and the *settings* that made it. A file at an output path without a record
  was not written by guided-swap and is never replaced.
- ``OUT/index.jsonl``: one record per input of the last run, failures included (``error`` set).
- A result's files are replaced together or not at all (:class:`Together`).
- ``OUT/.guided-swap.lock``: while a run holds ``OUT`` (:class:`Lock`), another is refused.
- Hidden temporaries only (``.NAME.PID-TOKEN.part``, :mod:`guided_swap._files`), removed by the next run: the
  half-written results of a killed run, and ``.NAME.maps.PID-TOKEN.part``, the arrays of a figure still to draw.

>>> layout_names(["photos/a.jpg", "photos/sub/a.png"], ["photos"])
['a.jpg', 'sub/a.png']
"""
import errno
import hashlib
import json
import os
import socket
import stat
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .._files import PART_EXTRA, atomic_write, part_name, remove_if_present
from .._version import __version__
from ..core.errors import CommandError

MARKER = ".guided-swap"
LOCK = ".guided-swap.lock"
INDEX = "index.jsonl"
PNG_KEY = "guided-swap record"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
KINDS = ("npz", "png")


@dataclass(frozen=True)
class Item:
    """One input: its path as found, its name under ``OUT`` (relative, ``/``-separated) and, for an input that
    cannot be explained whatever the run does (a link to nothing, a named pipe), why: its index line says so."""

    path: str
    name: str
    error: Optional[str] = None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _real(path: str) -> str:
    return os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def layout_names(paths: Sequence[str], roots: Sequence[str]) -> List[str]:
    """Each path's name relative to the deepest folder holding every root (``/``-separated)."""
    base = os.path.commonpath([os.path.abspath(r) for r in roots])
    return [os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/") for p in paths]


def _walk(folder: str, out_real: str, links: List[str], unlisted: List[str]) -> List[str]:
    """The image files under ``folder``, sorted; the links to folders met are added to ``links`` (not followed),
    the folders that could not be listed to ``unlisted`` (each with why)."""
    found = []

    def refused(error: OSError) -> None:
        unlisted.append(f"{error.filename} ({error.strerror or error})")

    for root, dirs, files in os.walk(folder, onerror=refused):
        links += [os.path.join(root, d) for d in sorted(dirs)
                  if not _is_hidden(d) and os.path.islink(os.path.join(root, d))]
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d) and not os.path.islink(os.path.join(root, d))
                         and not _is_results(os.path.join(root, d), out_real))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not _is_hidden(f) and f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _is_results(folder: str, out_real: str) -> bool:
    return os.path.exists(os.path.join(folder, MARKER)) or _real(folder) == out_real


def check_out(out: str) -> None:
    """``--out`` names a folder, or nothing yet."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out!r} is a file; give a folder for the results")


def unreadable(path: str, out_real: str) -> Optional[str]:
    """Why an input file found cannot be explained, whatever the run does, or None: a link to nothing (or one in a
    loop of links), a named pipe (reading one would wait forever), an empty file, a link into ``OUT``."""
    try:
        status = os.stat(path)
    except OSError as error:
        if os.path.islink(path):
            what = "which does not exist" if error.errno == errno.ENOENT else "which cannot be followed"
            return f"a symbolic link to {os.readlink(path)!r}, {what} ({error.strerror}): not read"
        return f"cannot read it: {error.strerror or error}"
    if not stat.S_ISREG(status.st_mode):
        return "not a regular file (a named pipe, socket or device): not read"
    if status.st_size == 0:
        return "an empty file (0 bytes): not an image"
    if _inside(_real(path), out_real):
        return "a link to a file in --out: results are never taken as inputs"
    return None


@dataclass
class Found:
    """The inputs a run found: each with its name under ``OUT``; the links to folders not followed; the inputs
    whose names under ``OUT`` differ from their paths (too long for the file system, or clashing); the folders
    that could not be listed; the second paths to a file found already (explained once)."""

    items: List[Item]
    links: List[str] = field(default_factory=list)
    renamed: List[int] = field(default_factory=list)
    unlisted: List[str] = field(default_factory=list)
    again: List[str] = field(default_factory=list)  # second paths (links) to a file found already


def discover(inputs: Sequence[str], out: str) -> List[Item]:
    """The inputs' image files, each once, with names under ``OUT`` that never collide (:func:`find`)."""
    return find(inputs, out).items


def find(inputs: Sequence[str], out: str) -> Found:
    """The inputs' image files, each once, with collision-free names (:func:`output_names`); layout errors
    before anything is written. Links to folders are not followed (``Found.links``); an input that cannot be
    read is kept, with its reason (``Item.error``), so its index line says so."""
    out_real = _real(out)
    check_out(out)
    for path in inputs:
        if not os.path.exists(path):
            raise CommandError(f"no such file or folder: {path!r}")
    folders = [p for p in inputs if os.path.isdir(p)]
    for folder in folders:
        if os.path.exists(os.path.join(folder, MARKER)):
            raise CommandError(f"{folder!r} is a guided-swap results folder; results are never taken as inputs")
    holders = folders + [os.path.dirname(os.path.abspath(p)) for p in inputs if not os.path.isdir(p)]
    for holder in holders:
        if _inside(_real(holder), out_real):
            what = "is" if _real(holder) == out_real else "holds"
            raise CommandError(f"--out {out!r} {what} the input folder {holder!r}: results would mix with (and could "
                               "replace) inputs; give --out a folder of its own, outside the inputs")
    if os.path.isdir(out) and not os.path.exists(os.path.join(out, MARKER)) and any(
            _inside(out_real, _real(folder)) for folder in folders):
        held = _walk(out, "", [], [])  # OUT is never searched for inputs: the images it holds would be left out
        if held:
            raise CommandError(f"--out {out!r} lies in an input folder and holds {len(held)} image(s) of its own "
                               f"(first {held[0]!r}), which would be left out, not explained, and mixed with results; "
                               "give --out a folder of its own (an empty or new one, or an earlier results folder)")
    paths, seen, links, unlisted, again = [], {}, [], [], []
    for path in inputs:
        for file in _walk(path, out_real, links, unlisted) if os.path.isdir(path) else [path]:
            if _real(file) in seen:
                again.append(f"{file} (as {seen[_real(file)]})")
            else:
                seen[_real(file)] = file
                paths.append(file)
    if not paths:
        raise CommandError(f"no images found in {', '.join(map(repr, inputs))} "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)})" + (
                               f"; links to folders are not followed ({len(links)} skipped, first {links[0]!r}): "
                               "give the folder they point to" if links else "") + (
                               f"; {len(unlisted)} folder(s) could not be read, first {unlisted[0]}"
                               if unlisted else ""))
    roots = [p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in inputs]
    layout = layout_names(paths, roots)
    names, clashes = output_names(layout, name_max(out))
    items = [Item(p, n, clashes.get(i) or unreadable(p, out_real)) for i, (p, n) in enumerate(zip(paths, names))]
    return Found(items, links, [i for i, (a, b) in enumerate(zip(layout, names)) if a != b], unlisted, again)


# --- names under OUT -----------------------------------------------------------------------------------------

LONGEST_SUFFIX = len(".maps")  # of what is written beside NAME: NAME.npz, NAME.png, NAME.maps (a stash's base)
"""A result's file name is NAME + ``.npz``/``.png``; its temporaries add :data:`~guided_swap._files.PART_EXTRA`
more (``.NAME.npz.PID-TOKEN.part``, ``.NAME.maps.PID-TOKEN.part``)."""


def name_max(out: str) -> int:
    """The longest file name, in bytes, the file system of ``out`` (or of its nearest existing folder) takes."""
    folder = os.path.abspath(out)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError, TypeError):  # no pathconf (Windows), or no answer
        return 255


def _bytes(text: str) -> int:
    return len(os.fsencode(text))


def tagged(component: str, key: str, budget: int) -> str:
    """``component`` made unique and at most ``budget`` bytes: its start (cut at a character), ``~`` and 12 hex
    digits of a hash of ``key`` (the input's whole name, so the same input always gets the same name), then its
    extension.

    >>> tagged("c.png", "c.png", 255)
    'c~58704e585ac9.png'
    >>> len(tagged("x" * 300 + ".jpg", "x" * 300 + ".jpg", 100).encode())
    100
    """
    digest = hashlib.sha256(os.fsencode(key)).hexdigest()[:12]
    stem, extension = os.path.splitext(component)
    if _bytes(extension) > 16:
        stem, extension = component, ""
    room = budget - _bytes(f"~{digest}{extension}")
    kept, used = [], 0
    for character in stem:
        used += _bytes(character)
        if used > room:
            break
        kept.append(character)
    return f"{''.join(kept)}~{digest}{extension}"


def same_on_any_disk(name: str) -> str:
    """What ``name`` is on a file system that ignores case or Unicode normalisation (macOS, Windows, exFAT, SMB
    shares): two names with the same key are one file there.

    >>> same_on_any_disk("Caf\u00e9.PNG") == same_on_any_disk("cafe\u0301.png")
    True
    """
    return unicodedata.normalize("NFC", name).casefold()


RESERVED = tuple(same_on_any_disk(name) for name in (INDEX, MARKER, LOCK))
"""OUT's own files: no result folder may take their names."""


def _folders(names: Iterable[str]) -> set:
    return {same_on_any_disk(name.rsplit("/", k)[0]) for name in names for k in range(1, name.count("/") + 1)}


def _clashes(names: Sequence[str]) -> List[int]:
    """The inputs whose result (NAME.npz, NAME.png) would be a folder other results go in, and those whose name is
    another's on a file system that ignores case or normalisation (all but the first of each such group)."""
    folders, seen = _folders(names), set()
    found = []
    for i, name in enumerate(names):
        key = same_on_any_disk(name)
        if key in seen or any(f"{key}.{kind}" in folders for kind in KINDS):
            found.append(i)
        seen.add(key)
    return found


def _fitted(name: str, limit: int, room: int) -> str:
    """``name`` with each folder at most ``limit`` bytes and not one of OUT's own files, and the file's name at
    most ``room`` bytes (else :func:`tagged`)."""
    parts = name.split("/")
    folders = [part if _bytes(part) <= limit and not (k == 0 and same_on_any_disk(part) in RESERVED)
               else tagged(part, "/".join(parts[:k + 1]), limit) for k, part in enumerate(parts[:-1])]
    last = parts[-1] if _bytes(parts[-1]) <= room else tagged(parts[-1], name, room)
    return "/".join(folders + [last])


def output_names(names: Sequence[str], limit: int = 255) -> Tuple[List[str], Dict[int, str]]:
    """The inputs' names under ``OUT`` from their layout names: every folder name at most ``limit`` bytes, every
    file name with room for the longest suffix and a temporary's, no folder named as OUT's own files
    (``index.jsonl/``), no result where another's folder must go (``c.png`` beside a folder ``c.png.png/``), and
    no two names that one file system would take for one (``Case.png`` and ``case.png``, ``café`` composed and
    decomposed: :func:`same_on_any_disk`): such a name is :func:`tagged`. Returns the names and, for any input
    that still could not get a name of its own, why (it is then not explained).

    >>> output_names(["c.png", "c.png.png/d.png"])[0]
    ['c~58704e585ac9.png', 'c.png.png/d.png']
    >>> output_names(["a.png"])
    (['a.png'], {})
    """
    room = limit - LONGEST_SUFFIX - PART_EXTRA
    out = [_fitted(name, limit, room) for name in names]
    for i in _clashes(out):
        head, _, last = out[i].rpartition("/")
        out[i] = (head + "/" if head else "") + tagged(last, names[i], room)
    problems = {}
    for i in _clashes(out):
        problems[i] = (f"its result would be named {out[i]}.npz/.png, a folder other results go in or another "
                       "input's result; rename the input")
    return out, problems


def output_paths(out: str, item: Item, save: Sequence[str]) -> Dict[str, str]:
    """``{"npz": OUT/NAME.npz, "png": OUT/NAME.png}`` for the kinds saved."""
    return {kind: os.path.join(out, *item.name.split("/")) + "." + kind for kind in save}


def read_record(path: str) -> Optional[dict]:
    """The record a result file carries, or None when it carries none (not guided-swap's, or unreadable)."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                return json.loads(str(data["record"])) if "record" in data.files else None
        with Image.open(path) as image:
            text = image.info.get(PNG_KEY)
        return json.loads(text) if text else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def source_stamp(path: str) -> Dict[str, int]:
    """Size and modification time of an input: a result whose input changed since is made again."""
    stat = os.stat(path)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class Plan:
    """What a run will do: every input, which still need explaining, the records of those already done, the
    failed records of those that cannot be explained (an unreadable input, an output path blocked), and which
    results to do replace files already there (written together with their other file, or not at all)."""

    out: str
    items: List[Item]
    todo: List[int]
    done: Dict[int, dict] = field(default_factory=dict)
    replaced: int = 0
    changed: int = 0
    failed: Dict[int, dict] = field(default_factory=dict)
    replacing: List[int] = field(default_factory=list)
    links: List[str] = field(default_factory=list)
    renamed: List[int] = field(default_factory=list)
    unlisted: List[str] = field(default_factory=list)
    again: List[str] = field(default_factory=list)


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])


def _blocked(out: str, item: Item, paths: Dict[str, str], kinds: Dict[str, bool]) -> Optional[str]:
    """Why an input's results cannot go where they must (a file where their folder goes, a folder at a result's
    path: left there by another layout of inputs, or not guided-swap's), or None. ``kinds``: a cache, path ->
    whether it is a folder, for the folders on the way."""
    parts = item.name.split("/")[:-1]
    for k in range(1, len(parts) + 1):
        folder = os.path.join(out, *parts[:k])
        if folder not in kinds:
            kinds[folder] = not os.path.lexists(folder) or os.path.isdir(folder)
        if not kinds[folder]:
            return (f"{'/'.join(parts[:k])} in --out is a file where this result's folder must go; move it, or "
                    "choose another --out")
    for path in paths.values():
        if os.path.isdir(path):
            return (f"{os.path.relpath(path, out)} in --out is a folder where this result must go; move it, or "
                    "choose another --out")
    return None


def plan(items: List[Item], out: str, settings: Dict[str, Any], save: Sequence[str], force: bool,
         done_kinds: Optional[Sequence[str]] = None) -> Plan:
    """Sort inputs into done (same settings, input unchanged, every output of ``done_kinds`` present; default
    ``save``), to do, and failed (an input that cannot be read, or whose result's path is blocked: a one-line
    reason each; the others go on).

    Raises :class:`~guided_swap.core.errors.CommandError` for an output path holding a file guided-swap did not
    write, and for results made with other settings unless ``force`` (then they are replaced).
    """
    result = Plan(out, items, [])
    foreign, conflicts, folders = [], [], {}
    kinds = list(save if done_kinds is None else done_kinds)
    for index, item in enumerate(items):
        paths = output_paths(out, item, save)
        reason = item.error or _blocked(out, item, paths, folders)
        if reason is None:
            try:
                stamp = source_stamp(item.path)
            except OSError as error:  # gone since it was found
                reason = f"cannot read it: {error.strerror or error}"
        if reason is not None:
            result.failed[index] = failure_record(item, settings, reason)
            continue
        existing = {kind: p for kind, p in paths.items() if os.path.lexists(p)}
        records = {kind: read_record(p) for kind, p in existing.items()}
        foreign += [p for kind, p in existing.items() if records[kind] is None]
        old = [r for r in records.values() if r is not None]
        if any(r.get("settings") != settings for r in old):
            conflicts.append((item, next(r for r in old if r.get("settings") != settings)))
            result.replaced += 1
            result.todo.append(index)
        elif all(records.get(kind) for kind in kinds) and all(r.get("source") == stamp for r in old):
            result.done[index] = records[kinds[0]]
        else:
            result.changed += any(r.get("source") != stamp for r in old)
            result.todo.append(index)
        if existing and result.todo and result.todo[-1] == index:
            result.replacing.append(index)
    if foreign:
        raise CommandError(f"{len(foreign)} output path(s) hold files guided-swap did not write (first: "
                           f"{foreign[0]!r}); they are never replaced: move them or choose another --out")
    if conflicts and not force:
        item, record = conflicts[0]
        raise CommandError(f"{len(conflicts)} result(s) in {out!r} were made with other settings (first: {item.name}: "
                           f"{_differences(record.get('settings') or {}, settings)}); pass --force to replace them, "
                           "or choose another --out")
    return result


def prepare(out: str) -> None:
    """Create ``OUT`` with its marker (rank 0, before any result is written)."""
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, MARKER)
    if not os.path.exists(marker):
        with atomic_write(marker) as temporary, open(temporary, "w") as stream:
            json.dump({"written_by": "guided_swap", "version": __version__}, stream)


def write_npz(path: str, arrays: Dict[str, np.ndarray], record: dict) -> None:
    """The arrays and the record (as the 0-d string array ``record``), atomically (inside :class:`Together`,
    with the other files of its result)."""
    with _written(path) as temporary, open(temporary, "wb") as stream:
        np.savez_compressed(stream, record=np.array(json.dumps(record)), **arrays)


def write_png(fig, path: str, record: dict) -> None:
    """A ``matplotlib.figure.Figure`` with the record in a PNG text chunk, atomically.

    The figure prints through its own canvas: no pyplot, so there is no figure registry to close it in (the
    figure is freed with its last reference).
    """
    metadata = {"Software": f"guided_swap {__version__}", PNG_KEY: json.dumps(record)}
    with _written(path) as temporary, open(temporary, "wb") as stream:
        fig.savefig(stream, format="png", dpi=110, metadata=metadata)


# --- a result's files, replaced together -------------------------------------------------------------------

_stage: Optional["Stage"] = None  # the Together call running in this process, if any


@contextmanager
def _written(path: str) -> Iterator[str]:
    """The temporary a result file is written to: renamed over ``path`` at once, or, inside :class:`Together`,
    with the other files of its result."""
    if _stage is None:
        with atomic_write(path, clean=False) as temporary:
            yield temporary
    else:
        yield _stage.temporary(path)


class Stage:
    """The files one :class:`Together` call writes: ``path -> temporary``."""

    def __init__(self, ready: Dict[str, str], hold: Dict[str, str]):
        self.ready, self.hold, self.written = dict(ready), dict(hold), {}

    def temporary(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = self.hold.get(path) or part_name(path)
        self.written[path] = temporary
        return temporary

    def discard(self) -> None:
        for temporary in list(self.written.values()) + list(self.ready.values()):
            remove_if_present(temporary)


@dataclass(frozen=True)
class Together:
    """``work(*args)`` (:func:`~guided_swap.app.writing.write_result`, ``draw_saved``) with every result file it
    writes (:func:`write_npz`, :func:`write_png`) going to a hidden temporary, all renamed into place together
    once every one is written (:func:`replace_together`): a write that fails (a full disk) leaves the files
    there were, all of them, and removes what it wrote.

    ``hold``: ``path -> temporary`` files written to that temporary and left there, for a later call to place;
    ``ready``: such temporaries, written earlier, placed with this call's files (or removed if it fails). So a
    ``.npz`` written in the explaining pass and the figure drawn from it in the drawing pass replace the old pair
    together."""

    work: Callable[..., None]
    ready: Dict[str, str] = field(default_factory=dict)
    hold: Dict[str, str] = field(default_factory=dict)

    def __call__(self, *args) -> None:
        global _stage
        stage = _stage = Stage(self.ready, self.hold)
        try:
            self.work(*args)
        except BaseException:
            stage.discard()
            raise
        finally:
            _stage = None
        placing = [(temporary, path) for path, temporary in stage.written.items() if path not in stage.hold]
        try:
            replace_together(placing + [(temporary, path) for path, temporary in stage.ready.items()])
        except BaseException:
            stage.discard()
            raise


def replace_together(moves: Sequence[Tuple[str, str]]) -> None:
    """Rename each ``(temporary, path)`` over its path, all or none: the files replaced are first hard-linked
    to hidden temporaries, and put back if a rename fails (where the file system has no hard links, a failed
    rename leaves the files renamed before it)."""
    backups: Dict[str, str] = {}
    placed: List[str] = []
    try:
        for _, path in moves:
            if os.path.isfile(path):
                backup = part_name(path)
                try:
                    os.link(path, backup)
                    backups[path] = backup
                except OSError:
                    pass
        for temporary, path in moves:
            os.replace(temporary, path)
            placed.append(path)
    except BaseException:
        for path in reversed(placed):
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                remove_if_present(path)
        raise
    finally:
        for backup in backups.values():
            remove_if_present(backup)


# --- one run at a time on OUT --------------------------------------------------------------------------------

class Lock:
    """An exclusive lock on ``OUT`` (``flock`` on ``OUT/.guided-swap.lock``, which says who holds it), held by one
    run from before it plans to its end; a second run is refused, naming the holder. The kernel lets go when the
    holder ends, killed or not, so a stale file never blocks. The processes of one torchrun run share their
    rank 0's lock. Where ``flock`` is missing (Windows) or the file system refuses locks, there is no lock
    (``note`` says why)."""

    def __init__(self, out: str):
        self.out, self.path, self.fd, self.note = out, os.path.join(out, LOCK), None, None
        self.created: List[str] = []  # the folders this run made for OUT, deepest first

    @classmethod
    def take(cls, out: str) -> "Lock":
        check_out(out)
        lock = cls(out)
        lock.created = _make_folders(out)
        try:
            import fcntl  # optional: POSIX only; elsewhere the run goes on without a lock
        except ImportError:
            lock.note = "no lock on --out (no flock here): run one explain per --out at a time"
            return lock
        for _ in range(100):
            fd = _open_lock(lock)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _holder(fd)
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CommandError(f"--out {out!r} is in use by another guided-swap run ({holder}); wait for it "
                                       "to end, or choose another --out") from None
                lock.note = f"no lock on --out ({error.strerror}): run one explain per --out at a time"
                return lock
            try:  # the holder before may have removed the file as it let go: lock the file that is there
                same = os.path.samestat(os.fstat(fd), os.stat(lock.path))
            except FileNotFoundError:
                same = False
            if same:
                lock.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
                return lock
            os.close(fd)
        raise CommandError(f"could not take the lock on --out {out!r} (it kept changing); try again")

    def release(self) -> None:
        """Let go (the file goes first, so a run waiting locks the next one); ``OUT``, and the folders above it,
        go too if this run made them and left them empty (a run stopped before it wrote anything)."""
        if self.fd is not None:
            remove_if_present(self.path)
            os.close(self.fd)
            self.fd = None
        for folder in self.created:
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.created = []


def _unwritable(out: str, error: OSError) -> CommandError:
    return CommandError(f"--out {out!r} cannot be written ({error.strerror or error}); choose another --out")


def _make_folders(out: str) -> List[str]:
    """Make ``out`` and the folders above it that are missing; those made, deepest first."""
    missing, folder = [], os.path.abspath(out)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise _unwritable(out, error) from None
    return missing


def _open_lock(lock: "Lock") -> int:
    try:
        return os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        lock.release()
        raise _unwritable(lock.out, error) from None


def _holder(fd: int) -> str:
    try:
        held = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {held['pid']} on {held['host']}, since {held['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown: it is starting"


def stash_base(out: str, item: Item) -> str:
    """The path whose hidden temporaries (``OUT/.NAME.maps.PID-TOKEN.part``) hold an input's figure arrays
    until its figure is drawn; no result is ever written there."""
    return os.path.join(out, *item.name.split("/")) + ".maps"


def write_stash(path: str, arrays: Dict[str, np.ndarray], record: dict) -> None:
    """A hidden temporary with the arrays (uncompressed: it lives for one run) and the record. A killed run
    leaves it hidden; the next run removes it with every other temporary."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as stream:
        np.savez(stream, record=np.array(json.dumps(record)), **arrays)


def read_saved(path: str, names: Sequence[str]):
    """``(record, arrays)`` of a ``.npz`` result or a stash, the arrays those of ``names`` it has; ``(None,
    {})`` when the file is missing, unreadable or carries no record."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "record" not in data.files:
                return None, {}
            record = json.loads(str(data["record"]))
            return record, {name: data[name] for name in names if name in data.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None, {}


def fingerprint(record: dict) -> str:
    """A digest of a record, to check that a file holds the very result a run counted (NaN equals NaN here).

    >>> fingerprint({"a": 1, "b": [2.5]}) == fingerprint({"b": [2.5], "a": 1})
    True
    """
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def failure_record(item: Item, settings: Dict[str, Any], error: str) -> dict:
    """The index line of an input that was not explained."""
    return {"input": item.path, "name": item.name, "outputs": [], "target": None, "target_name": None,
            "score": None, "probability": None, "top5": [], "cam_peak": None, "settings": settings, "error": error}


def write_index(out: str, records: Iterable[dict]) -> str:
    """``OUT/index.jsonl``, one JSON record per line, replaced atomically."""
    path = os.path.join(out, INDEX)
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
    return path


def read_index(out: str) -> List[dict]:
    """The records of ``OUT/index.jsonl``."""
    with open(os.path.join(out, INDEX), encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def normalised(settings: Dict[str, Any]) -> Dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists), so a comparison is exact."""
    return json.loads(json.dumps(settings))


def top_classes(probabilities: Sequence[float], labels: Optional[Sequence[str]], k: int = 5) -> List[dict]:
    """The ``k`` most probable classes, each ``{"class", "name", "probability"}``.

    >>> top_classes([0.1, 0.7, 0.2], ["a", "b", "c"], k=2)
    [{'class': 1, 'name': 'b', 'probability': 0.7}, {'class': 2, 'name': 'c', 'probability': 0.2}]
    """
    order = np.argsort(-np.asarray(probabilities), kind="stable")[:k]
    return [{"class": int(c), "name": labels[c] if labels is not None else None,
             "probability": float(probabilities[c])} for c in order]


def peak(cam: np.ndarray) -> List[int]:
    """Where a map is largest, as (row, column) in the model's input.

    >>> peak(np.array([[0.0, 1.0], [3.0, 2.0]]))
    [1, 0]
    """
    return [int(i) for i in np.unravel_index(int(np.argmax(cam)), cam.shape)]
