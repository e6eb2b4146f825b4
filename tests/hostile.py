"""Hostile files for the loading tests: a pickle that writes a marker file when unpickled, and a forger that edits
a saved explainer's parts and recomputes the checksums in its header, as an attacker would."""
import json
import os
import zipfile
import zlib

from guided_swap.run import saved


class WritesMarker:
    """Unpickling this object creates ``marker`` (``open(marker, "w")``): code from the file, run."""

    def __init__(self, marker: str):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def parts(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def forge(source, target, description=None, header=None, replace=None, drop=()) -> None:
    """Write ``target``: ``source`` with its description (``description(dict)`` edits it in place), header
    (likewise) and parts (``replace``: name -> bytes) changed, and the header's checksums made to match again."""
    contents = parts(source)
    if description is not None:
        data = json.loads(contents[saved.DESCRIPTION])
        description(data)
        contents[saved.DESCRIPTION] = json.dumps(data).encode()
    contents.update(replace or {})
    for name in drop:
        contents.pop(name, None)
    head = json.loads(contents.pop(saved.HEADER))
    head["parts"] = {name: zlib.crc32(data) for name, data in contents.items()}
    if header is not None:
        header(head)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(saved.HEADER, json.dumps(head))
        for name, data in contents.items():
            archive.writestr(name, data)


def marker_written(marker) -> bool:
    return os.path.exists(marker)
