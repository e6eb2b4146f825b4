"""A saved explainer's tensors: one safetensors part of the zip, written by the safetensors library and read back
straight into each tensor's own memory.

Writing uses ``safetensors.torch.save`` (tensors on the CPU, contiguous, one storage each). Reading parses the
safetensors layout itself (an 8-byte length, a JSON table of ``dtype``, ``shape`` and ``data_offsets``, then the
bytes with no gaps) and reads each tensor's bytes from the file into a tensor allocated for it: one copy, no
unpickling, and the member's CRC-32 checked on the way. Every entry is checked (known dtype, sizes that match
its byte range, ranges in order and inside the part, the part inside the file) before anything is allocated, so a
damaged or edited part raises :class:`LoadError` and a size the file does not hold is never allocated.

>>> import io, zipfile, torch
>>> data = tensor_bytes({"w": torch.arange(6.).view(2, 3), "b": torch.tensor([True, False])})
>>> buffer = io.BytesIO()
>>> with zipfile.ZipFile(buffer, "w") as archive:
...     archive.writestr("tensors.safetensors", data)
>>> with zipfile.ZipFile(buffer) as archive:
...     tensors = read_tensors(buffer, archive.getinfo("tensors.safetensors"))
>>> tensors["w"], tensors["b"]
(tensor([[0., 1., 2.],
        [3., 4., 5.]]), tensor([ True, False]))
"""
import io
import json
import math
import struct
import zipfile
import zlib
from typing import IO, Dict, List, Tuple

import torch
from safetensors.torch import save

from ..core.errors import LoadError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
          "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16}
_MAX_HEADER = 100 * 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then the name and extra-field lengths at offset 26


def tensor_bytes(tensors: Dict[str, torch.Tensor]) -> bytes:
    """The tensors as safetensors: on the CPU, contiguous, one storage each (safetensors shares none)."""
    prepared, storages = {}, set()
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        prepared[key] = t
    return save(prepared)


def read_tensors(stream: IO[bytes], info: zipfile.ZipInfo) -> Dict[str, torch.Tensor]:
    """The tensors of the zip member ``info`` of the opened file ``stream``; :class:`LoadError` when damaged."""
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        raise LoadError("the tensors part is compressed, which guided_swap never writes: the file is edited")
    start, size = _data_start(stream, info), info.file_size
    end = stream.seek(0, io.SEEK_END)
    if start + size > end:  # checked before any tensor is allocated: a declared size is not believed
        raise LoadError(f"the tensors part says it holds {size} bytes, which reach {start + size - end} bytes past "
                        "the end of the file: it is truncated or edited")
    stream.seek(start)
    if size < 8:
        raise LoadError("the tensors part is truncated")
    head = _read(stream, 8)
    length = struct.unpack("<Q", head)[0]
    if length > min(_MAX_HEADER, size - 8):
        raise LoadError("the tensors part has a damaged table of contents")
    table = _read(stream, length)
    crc = zlib.crc32(table, zlib.crc32(head))
    tensors, crc = _read_entries(stream, _entries(table, size - 8 - length), crc)
    if crc != info.CRC:
        raise LoadError("the tensors part does not match its CRC-32: the file is damaged")
    return tensors


def _data_start(stream: IO[bytes], info: zipfile.ZipInfo) -> int:
    stream.seek(info.header_offset)
    fields = stream.read(_LOCAL_HEADER.size)
    if len(fields) != _LOCAL_HEADER.size or fields[:4] != b"PK\x03\x04":
        raise LoadError("the tensors part's zip entry is damaged")
    _, name, extra = _LOCAL_HEADER.unpack(fields)
    return info.header_offset + _LOCAL_HEADER.size + name + extra


def _read(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise LoadError("the tensors part is truncated")
    return data


def _entries(table: bytes, data_size: int) -> List[Tuple[int, int, str, torch.dtype, List[int]]]:
    """(start, end, name, dtype, shape) of every tensor, in file order, checked to tile the data exactly."""
    try:
        described = json.loads(table)
    except (ValueError, RecursionError):  # also a number too long to convert (int_max_str_digits)
        raise LoadError("the tensors part has a damaged table of contents") from None
    if not isinstance(described, dict):
        raise LoadError("the tensors part has a damaged table of contents")
    entries = [_entry(name, value) for name, value in described.items() if name != "__metadata__"]
    entries.sort(key=lambda e: (e[0], e[1]))
    end = 0
    for start, stop, name, _, _ in entries:
        if start != end:
            raise LoadError(f"tensor {name} does not follow the one before it in the tensors part: damaged or edited")
        end = stop
    if end != data_size:
        raise LoadError("the tensors part's table of contents does not cover its data: damaged or edited")
    return entries


def _entry(name: str, value) -> Tuple[int, int, str, torch.dtype, List[int]]:
    ok = isinstance(value, dict) and value.get("dtype") in DTYPES and type(value.get("shape")) is list and all(
        type(s) is int and s >= 0 for s in value["shape"]) and type(value.get("data_offsets")) is list and len(
        value["data_offsets"]) == 2 and all(type(o) is int for o in value["data_offsets"])
    if not ok:
        raise LoadError(f"tensor {name!r} has a damaged entry in the tensors part")
    dtype, (start, stop) = DTYPES[value["dtype"]], value["data_offsets"]
    if stop - start != math.prod(value["shape"]) * dtype.itemsize or start < 0:
        raise LoadError(f"tensor {name!r}: its bytes do not hold its shape {value['shape']}: damaged or edited")
    return start, stop, name, dtype, value["shape"]


def _read_entries(stream: IO[bytes], entries, crc: int) -> Tuple[Dict[str, torch.Tensor], int]:
    tensors = {}
    for start, stop, name, dtype, shape in entries:
        try:  # an empty tensor's sizes hold no bytes to check them against: torch refuses those it cannot index
            tensor = torch.empty(shape, dtype=dtype)
        except (RuntimeError, TypeError, ValueError, OverflowError) as error:
            raise LoadError(f"tensor {name!r} has the shape {str(shape)[:80]}, which torch cannot make "
                            f"({type(error).__name__}): damaged or edited") from None
        if stop > start:
            target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if stream.readinto(target) != stop - start:
                raise LoadError("the tensors part is truncated")
            crc = zlib.crc32(target, crc)
        tensors[name] = tensor
    return tensors, crc
