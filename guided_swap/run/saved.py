"""The file format of a saved explainer (`ex.save`, `gs.load`): graph code, weights, layers, rule and report in one file.

The file is a zip with a JSON header (format, guided_swap and torch versions, rule, layers) and the pickled
explainer. An explainer captured as a graph (fx or export) carries the graph's own code, so loading it needs
only guided_swap and torch (and the classes of any custom leaf modules), not the model's class. One captured
at run time (``report.capture`` starts with ``runtime``) has no graph and holds a copy of the model: loading it
needs the model's classes, importable by the same names, as ``torch.load`` of a whole model does. Like
``torch.load``, it unpickles: load only files you trust.

>>> import torch, torchvision, guided_swap as gs, tempfile, os
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> path = os.path.join(tempfile.mkdtemp(), "resnet18.gsx")
>>> ex.save(path)
>>> gs.load(path).layers
('layer4',)
"""
import io
import json
import os
import warnings
import zipfile

import torch

from .._files import atomic_write
from .._version import __version__
from ..core.errors import LoadError

FORMAT = "guided_swap.run.explainer"
FORMAT_VERSION = 3  # 3: the explainer holds a Capture (guided_swap 0.x stage layout)
HEADER, PAYLOAD = "guided_swap.json", "explainer.pt"


def save_object(obj, path: str, details: dict) -> None:
    """Write ``obj`` with a header (format, versions, and ``details``) to ``path`` atomically: a crash never
    leaves half a file under that name. Pickling errors propagate before anything is written."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "guided_swap_version": __version__,
              "torch_version": torch.__version__, **details}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as temporary, zipfile.ZipFile(temporary, "w") as archive:
        archive.writestr(HEADER, json.dumps(header, indent=1))
        archive.writestr(PAYLOAD, buffer.getvalue())


def read_header(path: str) -> dict:
    """The header of a saved explainer, validated; raises :class:`LoadError` for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no explainer file at {path!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if HEADER not in names:
                kind = "a torch.export program: load it with torch.export.load" if any(
                    n.endswith(".json") or "/data/" in n for n in names) else "not a guided_swap explainer"
                raise LoadError(f"{path!r} is {kind} (no {HEADER} inside)")
            header = json.loads(archive.read(HEADER))
    except zipfile.BadZipFile as error:
        raise LoadError(f"{path!r} is truncated, corrupt, or not a guided_swap explainer file ({error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{path!r} has a damaged header ({error})") from None
    _check_compatible(path, header)
    return header


def _check_compatible(path: str, header: dict) -> None:
    if header.get("format") != FORMAT:
        raise LoadError(f"{path!r} is not a guided_swap explainer (format {header.get('format')!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{path!r} was written by guided_swap {header.get('guided_swap_version')} in file format "
                        f"{header.get('format_version')}; this guided_swap reads format {FORMAT_VERSION}. "
                        "Convert the model again with this version")
    if header.get("torch_version", "").split(".")[:2] != torch.__version__.split(".")[:2]:
        warnings.warn(f"{path!r} was saved with torch {header.get('torch_version')}, this is torch {torch.__version__}; "
                      "the graph is re-generated from its code, but check the maps once", stacklevel=3)


def load_object(path: str, map_location=None):
    """The object saved by :func:`save_object`, after checking the header."""
    read_header(path)
    try:
        with zipfile.ZipFile(path) as archive:
            payload = archive.read(PAYLOAD)
        explainer = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError, OSError) as error:
        raise LoadError(f"{path!r} is truncated or corrupt: {type(error).__name__}: {error}") from None
    except (ModuleNotFoundError, AttributeError) as error:
        raise LoadError(f"{path!r} needs a class that is not importable here ({error}); the classes of custom leaf "
                        "modules, and for an explainer captured at run time the model's own classes (it holds a "
                        "copy of the model), must be importable by the names they had when saved") from None
    return explainer
