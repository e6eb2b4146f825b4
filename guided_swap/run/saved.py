"""The file a saved explainer is (``ex.save``, ``gs.load``): a zip of a JSON header, a JSON description,
safetensors, and (only when something cannot be data) a pickle that loads only with ``trust=True``.

Parts of a file in format 4:

- ``guided_swap.json``: the header: format and version, guided_swap and torch versions, rule, layers, capture
  path, the CRC-32 of every other part, and ``needs_trust``: what in the file only unpickling can rebuild
  (empty for a file that loads without trust);
- ``explainer.json``: the explainer's description (:mod:`guided_swap.run.explainer_file`): graphs, modules,
  rule, report, all as data;
- ``tensors.safetensors``: every weight and buffer, read without unpickling (:mod:`guided_swap.run.tensor_file`);
- ``pickled.pt``: the objects that are not data (a user's rule, a custom leaf module, a ``reshape=`` function,
  a run-time capture's copy of the model). It is not even read unless the caller passes ``trust=True``.

Loading checks the header, then each part against the checksum the header was written with, each tensor
against its description, and the header against the contents, so a truncated, damaged or edited file raises
:class:`LoadError` instead of giving a wrong explainer. (A checksum in the file is no signature: whoever edits
the file can rewrite it. What keeps a hostile file from running code is that loading runs none.) A file in the pickled format 3 (guided_swap before the
safe format) loads only with ``trust=True``; saving it again writes format 4.

>>> import torch, torchvision, guided_swap as gs, tempfile, os
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> path = os.path.join(tempfile.mkdtemp(), "resnet18.gsx")
>>> ex.save(path)
>>> header = read_header(path)
>>> header["format_version"], header["needs_trust"], gs.load(path).layers
(4, [], ('layer4',))
"""
import io
import json
import os
import warnings
import zipfile
import zlib
from typing import Any, Dict, NamedTuple, Optional

import torch

from .._files import atomic_write
from .._version import __version__
from ..core.errors import LoadError
from .tensor_file import read_tensors, tensor_bytes

FORMAT = "guided_swap.run.explainer"
FORMAT_VERSION = 4  # 4: data (JSON + safetensors), pickle only for what needs trust; 3: one pickle
LEGACY_VERSION = 3
HEADER, DESCRIPTION, TENSORS, PICKLED = "guided_swap.json", "explainer.json", "tensors.safetensors", "pickled.pt"
LEGACY_PAYLOAD = "explainer.pt"
MAX_HEADER_BYTES = 16 << 20  # a header is a few kB; its declared size is checked before it is read


class Contents(NamedTuple):
    """What a file holds, read: its header, description, raw tensors and (trusted only) pickled objects; or, for
    a format-3 file opened with trust, the explainer it unpickles to (``legacy``)."""

    header: Dict[str, Any]
    description: Any = None
    tensors: Dict[str, torch.Tensor] = {}
    pickled: Optional[Dict[str, Any]] = None
    legacy: Any = None


# --- writing -----------------------------------------------------------------------------------------------

def write(path: str, details: Dict[str, Any], description: Dict[str, Any], tensors: Dict[str, torch.Tensor],
          pickled: Dict[str, Any], needs: Dict[str, str]) -> None:
    """Write the parts to ``path`` atomically (a crash never leaves half a file under that name); pickling
    errors propagate before anything is written."""
    parts = {DESCRIPTION: json.dumps(description, separators=(",", ":")).encode(), TENSORS: tensor_bytes(tensors)}
    if pickled:
        buffer = io.BytesIO()
        torch.save(pickled, buffer)
        parts[PICKLED] = buffer.getvalue()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "guided_swap_version": __version__,
              "torch_version": torch.__version__, **details,
              "parts": {name: zlib.crc32(data) for name, data in parts.items()},
              "needs_trust": list(dict.fromkeys(needs.values()))}
    with atomic_write(path) as temporary, zipfile.ZipFile(temporary, "w") as archive:
        archive.writestr(HEADER, json.dumps(header, indent=1))
        for name, data in parts.items():
            archive.writestr(name, data)


# --- reading -----------------------------------------------------------------------------------------------

def read_header(path: str) -> dict:
    """The header of a saved explainer, validated; raises :class:`LoadError` for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no explainer file at {path!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if HEADER not in names:
                raise LoadError(_foreign(path, names))
            data = _read_header_part(path, archive)
    except (zipfile.BadZipFile, EOFError, NotImplementedError) as error:
        raise LoadError(f"{path!r} is truncated, corrupt, or not a guided_swap explainer file ({error})") from None
    try:
        header = json.loads(data)
    except (ValueError, RecursionError) as error:  # also a number too long to convert (int_max_str_digits)
        raise LoadError(f"{path!r} has a damaged header ({error})") from None
    _check_compatible(path, header)
    return header


def _read_header_part(path: str, archive: zipfile.ZipFile) -> bytes:
    size = archive.getinfo(HEADER).file_size
    if size > MAX_HEADER_BYTES:
        raise LoadError(f"{path!r}: its header is {size / 2 ** 20:.0f} MB (guided_swap writes a few kB): the file "
                        "is edited")
    return archive.read(HEADER)


def _foreign(path: str, names) -> str:
    """What a zip without a guided_swap header is, and what opening it would take."""
    if any(name.endswith("/archive_format") or name.endswith("/models/model.json") for name in names):
        return (f"{path!r} is a torch.export program (.pt2), not a saved explainer: torch.export.load opens it, and "
                "that unpickles parts of it, so it trusts the file completely (only for files you trust)")
    if any(name.endswith("data.pkl") for name in names):
        return (f"{path!r} is a PyTorch checkpoint (torch.save), not a saved explainer: gs.load reads files written "
                "by Explainer.save; to explain a model from a state dict, build the model, load the state dict "
                "with torch.load(path, weights_only=True) and convert it")
    return f"{path!r} is not a guided_swap explainer (no {HEADER} inside)"


def _check_compatible(path: str, header: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LoadError(f"{path!r} is not a guided_swap explainer (format "
                        f"{header.get('format') if isinstance(header, dict) else header!r})")
    if header.get("format_version") not in (FORMAT_VERSION, LEGACY_VERSION):
        raise LoadError(f"{path!r} was written by guided_swap {header.get('guided_swap_version')} in file format "
                        f"{header.get('format_version')}; this guided_swap reads format {FORMAT_VERSION} (and "
                        f"{LEGACY_VERSION} with trust=True). Convert the model again with this version")
    if str(header.get("torch_version", "")).split(".")[:2] != torch.__version__.split(".")[:2]:
        warnings.warn(f"{path!r} was saved with torch {header.get('torch_version')}, this is torch {torch.__version__}; "
                      "the graph is rebuilt with this torch's ops, but check the maps once", stacklevel=4)


def read(path: str, trust: bool = False, map_location: Any = None) -> Contents:
    """What the file at ``path`` holds. Its pickled part is read only with ``trust=True``."""
    header = read_header(path)
    if header["format_version"] == LEGACY_VERSION:
        return Contents(header, legacy=_legacy(path, header, trust, map_location))
    checksums = header.get("parts")
    if not isinstance(checksums, dict) or not {DESCRIPTION, TENSORS} <= set(checksums) <= {DESCRIPTION, TENSORS, PICKLED}:
        raise LoadError(f"{path!r} has a header that does not list its parts: the file is damaged or edited")
    try:
        with open(path, "rb") as stream, zipfile.ZipFile(stream) as archive:
            _check_parts(path, archive, checksums)
            description = archive.read(DESCRIPTION)
            pickled = archive.read(PICKLED) if trust and PICKLED in checksums else None
            tensors = read_tensors(stream, archive.getinfo(TENSORS))
    except (zipfile.BadZipFile, KeyError, EOFError, OSError) as error:
        raise LoadError(f"{path!r} is truncated or corrupt: {type(error).__name__}: {error}") from None
    except LoadError as error:
        raise LoadError(f"{path!r}: {error}") from None
    try:
        description = json.loads(description)
    except (ValueError, RecursionError) as error:  # also a number too long to convert (int_max_str_digits)
        raise LoadError(f"{path!r} has a damaged description ({error})") from None
    if trust:  # trusted, and nothing pickled: an empty table (a reference into it is a damaged file)
        pickled = {} if pickled is None else _unpickled(path, pickled, map_location)
    return Contents(header, description, tensors, pickled)


def _check_parts(path: str, archive: zipfile.ZipFile, checksums: Dict[str, Any]) -> None:
    """Each part must be the one the header was written with (its CRC-32; zipfile checks the bytes against it),
    stored as guided_swap writes it: a compressed part could inflate to any size (a zip bomb)."""
    for name, checksum in checksums.items():
        if archive.getinfo(name).compress_type != zipfile.ZIP_STORED:
            raise LoadError(f"{name} is compressed, which guided_swap never writes: the file was edited or repacked "
                            "after saving; save or convert it again")
        if archive.getinfo(name).CRC != checksum:
            raise LoadError(f"{name} is not the part its header was written with (CRC-32 differs), so the file "
                            "was damaged or edited after saving; save or convert it again")


def _unpickled(path: str, data: bytes, map_location: Any) -> Dict[str, Any]:
    """The pickled objects (``trust=True`` only: unpickling runs code from the file)."""
    try:
        objects = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as error:
        raise LoadError(_missing_class(path, error)) from None
    except (EOFError, RuntimeError, OSError, ValueError) as error:
        raise LoadError(f"{path!r} has a damaged pickled part: {type(error).__name__}: {error}") from None
    if not isinstance(objects, dict):
        raise LoadError(f"{path!r} has a pickled part that is not a table of objects: damaged or edited")
    return objects


def _missing_class(path: str, error: Exception) -> str:
    return (f"{path!r} needs a class that is not importable here ({error}); the classes of custom leaf modules, of a "
            "user's rule, and for an explainer captured at run time the model's own classes (it holds a copy of the "
            "model), must be importable by the names they had when saved")


def _legacy(path: str, header: Dict[str, Any], trust: bool, map_location: Any) -> Any:
    """A format-3 file: one pickled explainer, so only with ``trust=True``."""
    if not trust:
        raise LoadError(f"{path!r} was written by guided_swap {header.get('guided_swap_version')} in file format "
                        f"{LEGACY_VERSION}, which is a pickle: opening it runs code from the file. If you trust where "
                        "it came from, load it with gs.load(path, trust=True) and save it again (ex.save(path)) to "
                        f"write format {FORMAT_VERSION}, which loads without running code; or convert the model again")
    try:
        with zipfile.ZipFile(path) as archive:
            payload = archive.read(LEGACY_PAYLOAD)
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError, OSError) as error:
        raise LoadError(f"{path!r} is truncated or corrupt: {type(error).__name__}: {error}") from None
    except (ModuleNotFoundError, AttributeError) as error:
        raise LoadError(_missing_class(path, error)) from None
