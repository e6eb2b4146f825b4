"""A results folder: where each input's outputs go, what each result records, which are done, the index.

Layout (``OUT`` is ``--out``):

- Inputs are found under the folders given (recursively, sorted; hidden files and folders skipped) and
  named by their path relative to the deepest folder holding every input, so the names never collide:
  ``photos/sub/pic.jpg`` explained with ``photos/`` gives ``OUT/sub/pic.jpg.npz`` and ``OUT/sub/pic.jpg.png``
  (the input's whole file name, extension included, plus the output's).
- ``OUT`` holds a hidden marker file, ``.guided-swap``; a folder with one is never searched for inputs.
- ``OUT`` may not be an input folder, nor hold one (nor the folder of an input file).
- Every ``.npz`` and ``.png`` carries its *record* (a JSON string; in the ``.npz`` as ``record``, in the PNG
  as the text chunk ``guided-swap record``): the input, the outputs, the target and its score, the top-5
  classes, the Grad-CAM peak, and the *settings* that made it. A file at an output path without a record
  was not written by guided-swap and is never replaced.
- ``OUT/index.jsonl``: one record per input of the last run, failures included (``error`` set).
- Hidden temporaries only (``.NAME.PID-TOKEN.part``, :mod:`guided_swap._files`), removed by the next run: the
  half-written results of a killed run, and ``.NAME.maps.PID-TOKEN.part``, the arrays of a figure still to draw.

>>> layout_names(["photos/a.jpg", "photos/sub/a.png"], ["photos"])
['a.jpg', 'sub/a.png']
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image

from .._files import atomic_write
from .._version import __version__
from ..core.errors import CommandError

MARKER = ".guided-swap"
INDEX = "index.jsonl"
PNG_KEY = "guided-swap record"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
KINDS = ("npz", "png")


@dataclass(frozen=True)
class Item:
    """One input: its path as found and its name under ``OUT`` (relative, ``/``-separated)."""

    path: str
    name: str


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


def _walk(folder: str, out_real: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d) and not _is_results(os.path.join(root, d), out_real))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not _is_hidden(f) and f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _is_results(folder: str, out_real: str) -> bool:
    return os.path.exists(os.path.join(folder, MARKER)) or _real(folder) == out_real


def discover(inputs: Sequence[str], out: str) -> List[Item]:
    """The inputs' image files, each once, with collision-free names; layout errors before anything is written."""
    out_real = _real(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out!r} is a file; give a folder for the results")
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
    paths, seen = [], set()
    for path in inputs:
        for file in _walk(path, out_real) if os.path.isdir(path) else [path]:
            if _real(file) not in seen:
                seen.add(_real(file))
                paths.append(file)
    if not paths:
        raise CommandError(f"no images found in {', '.join(map(repr, inputs))} "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    roots = [p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in inputs]
    return [Item(p, n) for p, n in zip(paths, layout_names(paths, roots))]


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
    """What a run will do: every input, which still need explaining, and the records of those already done."""

    out: str
    items: List[Item]
    todo: List[int]
    done: Dict[int, dict] = field(default_factory=dict)
    replaced: int = 0
    changed: int = 0


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])


def plan(items: List[Item], out: str, settings: Dict[str, Any], save: Sequence[str], force: bool,
         done_kinds: Optional[Sequence[str]] = None) -> Plan:
    """Sort inputs into done (same settings, input unchanged, every output of ``done_kinds`` present; default
    ``save``) and to do.

    Raises :class:`~guided_swap.core.errors.CommandError` for an output path holding a file guided-swap did not
    write, and for results made with other settings unless ``force`` (then they are replaced).
    """
    result = Plan(out, items, [])
    foreign, conflicts = [], []
    kinds = list(save if done_kinds is None else done_kinds)
    for index, item in enumerate(items):
        stamp = source_stamp(item.path)
        paths = output_paths(out, item, save)
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
    """The arrays and the record (as the 0-d string array ``record``), atomically."""
    with atomic_write(path, clean=False) as temporary, open(temporary, "wb") as stream:
        np.savez_compressed(stream, record=np.array(json.dumps(record)), **arrays)


def write_png(fig, path: str, record: dict) -> None:
    """A ``matplotlib.figure.Figure`` with the record in a PNG text chunk, atomically.

    The figure prints through its own canvas: no pyplot, so there is no figure registry to close it in (the
    figure is freed with its last reference).
    """
    metadata = {"Software": f"guided_swap {__version__}", PNG_KEY: json.dumps(record)}
    with atomic_write(path, clean=False) as temporary, open(temporary, "wb") as stream:
        fig.savefig(stream, format="png", dpi=110, metadata=metadata)


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
