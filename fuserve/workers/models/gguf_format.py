"""GGUF's container format (llama.cpp's single file): the header, its metadata key/values and the tensor
table, read from a memory map without touching tensor data.

Why our own reader instead of `gguf.GGUFReader`: the reference reader turns every metadata string into
numpy slices up front, which costs about two seconds on a 49k-token vocabulary; the engine wants the
config in milliseconds (the router reads it too). String arrays the caller does not ask for (the
vocabulary, the merges) are skipped and counted.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ggml type ids (ggml.h `enum ggml_type`); only the ones fuserve reads are named here.
GGML_F32 = 0
GGML_F16 = 1
GGML_Q4_0 = 2
GGML_Q4_1 = 3
GGML_Q8_0 = 8
GGML_BF16 = 30

# quantized type -> (elements per block, bytes per block)
BLOCK_TYPES: dict[int, tuple[int, int]] = {GGML_Q4_0: (32, 18), GGML_Q4_1: (32, 20), GGML_Q8_0: (32, 34)}
# float type -> (torch dtype, bytes per element)
FLOAT_TYPES: dict[int, tuple[torch.dtype, int]] = {
    GGML_F32: (torch.float32, 4),
    GGML_F16: (torch.float16, 2),
    GGML_BF16: (torch.bfloat16, 2),
}
SUPPORTED_GGML_TYPES: frozenset[int] = frozenset(BLOCK_TYPES) | frozenset(FLOAT_TYPES)

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)  # v1 used 32-bit counts and predates every file still published
_DEFAULT_ALIGNMENT = 32

# metadata value type -> struct format of one scalar
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_NUMPY_SCALARS: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


class UnreadStrings:
    """Stands in for a string array the caller did not ask to decode (a vocabulary, merges).

    Decoding 100k strings is what makes a metadata read slow, and most callers only need the count.
    """

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"UnreadStrings(count={self.count})"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor sits in the file and how it is stored; `shape` is in torch order."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute offset in the file

    @property
    def type_name(self) -> str:
        """The ggml type's name (`Q4_K`, ...), for error messages."""
        return ggml_type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies; only defined for the types this module reads."""
        elements = math.prod(self.shape)
        if self.ggml_type in FLOAT_TYPES:
            return elements * FLOAT_TYPES[self.ggml_type][1]
        block_elements, block_bytes = BLOCK_TYPES[self.ggml_type]
        return elements // block_elements * block_bytes


def ggml_type_name(ggml_type: int) -> str:
    """`Q4_K` for 12 and so on, using the gguf package's table so new types get their names too."""
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"ggml type {ggml_type}"


class _Cursor:
    """Sequential little-endian reads over the memory-mapped file."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer = buffer
        self.path = path
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        except struct.error as error:
            raise ValueError(f"{self.path}: GGUF header is truncated at byte {self.pos}") from error
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start, self.pos = self.pos, self.pos + length
        if self.pos > len(self.buffer):
            raise ValueError(f"{self.path}: GGUF string at byte {start} runs past the end of the file")
        return self.buffer[start : self.pos].decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            (length,) = self.unpack("Q")
            self.pos += length

    def value(self, value_type: int, key: str, string_arrays: Collection[str]) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("IQ")
            if element_type in _NUMPY_SCALARS:
                dtype = np.dtype(_NUMPY_SCALARS[element_type])
                end = self.pos + count * dtype.itemsize
                values = np.frombuffer(self.buffer[self.pos : end], dtype=dtype).tolist()
                self.pos = end
                return values
            if element_type == _STRING:
                if key in string_arrays:
                    return [self.string() for _ in range(count)]
                self.skip_strings(count)
                return UnreadStrings(count)
            if element_type == _ARRAY:
                return [self.value(_ARRAY, key, string_arrays) for _ in range(count)]
        raise ValueError(f"{self.path}: metadata key {key!r} has unknown GGUF value type {value_type}")


def read_gguf_metadata(
    path: str | Path, string_arrays: Collection[str] = ()
) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """All metadata key/values and the tensor table, without reading any tensor data.

    String arrays (the vocabulary, the merges) come back as `UnreadStrings` unless their key is in
    `string_arrays`; numeric arrays (token types, scores) are always read, they are cheap.
    """
    path = Path(path)
    if path.stat().st_size < 24:  # magic, version and the two counts
        raise ValueError(f"{path} is not a GGUF file (it is too short to hold a GGUF header)")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        return _parse_header(_Cursor(buffer, path), string_arrays)


def _parse_header(
    cursor: _Cursor, string_arrays: Collection[str]
) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    buffer, path = cursor.buffer, cursor.path
    if buffer[:4] != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    cursor.pos = len(_GGUF_MAGIC)
    (version,) = cursor.unpack("I")
    if version not in _GGUF_VERSIONS:
        if struct.unpack(">I", struct.pack("<I", version))[0] in _GGUF_VERSIONS:
            raise ValueError(f"{path} is a big-endian GGUF; only little-endian files are supported")
        raise ValueError(f"{path} is GGUF version {version}; supported versions are {_GGUF_VERSIONS}")
    tensor_count, kv_count = cursor.unpack("QQ")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        (value_type,) = cursor.unpack("I")
        metadata[key] = cursor.value(value_type, key, string_arrays)

    entries = []
    for _ in range(tensor_count):
        name = cursor.string()
        (n_dims,) = cursor.unpack("I")
        dims = cursor.unpack(f"{n_dims}Q")
        ggml_type, offset = cursor.unpack("IQ")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = [GGUFTensorInfo(name, shape, t, data_start + offset) for name, shape, t, offset in entries]
    return metadata, tensors
