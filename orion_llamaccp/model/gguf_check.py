"""Check that a file is a GGUF llama-server can load, reading only its header.

A truncated or damaged download otherwise surfaces much later as llama-server's cryptic
``missing tensor`` or ``data is not within the file bounds``. Here we parse the header
(magic, version, key/values, tensor infos) and check that every tensor's data lies inside
the file, the way llama.cpp's loader will. Tensor data is never read: the file is
memory-mapped and only header pages are touched, so a 70 GB model checks in a fraction of
a second. Hashing is separate (``sha256_file``) because it does read every byte.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orion_llamaccp.errors import ModelCorrupt, ModelError, ModelNotFound

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
HASH_CHUNK = 8 * 1024 * 1024

Scalar = str | int | float | bool

# GGUF value types: id -> struct format of one element (strings and arrays handled apart).
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9

# ggml type id -> (elements per block, bytes per block): gguf's GGML_QUANT_SIZES (0.19.0),
# copied because the gguf package pulls in numpy (~14 MB resident) for this one table.
# tests/model/test_gguf_check.py fails when the two differ.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}


@dataclass(frozen=True)
class GgufInfo:
    """What the header says; enough to announce the model and to check a split set."""

    path: Path
    size: int
    version: int
    tensor_count: int
    kv_count: int
    alignment: int
    data_offset: int
    data_end: int
    architecture: str | None = None
    name: str | None = None
    split_no: int | None = None
    split_count: int | None = None
    split_tensors_count: int | None = None
    metadata: Mapping[str, Scalar] = field(default_factory=dict, repr=False)

    @property
    def is_split(self) -> bool:
        return (self.split_count or 1) > 1

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) else None


class _Bad(Exception):
    """Internal: the header is malformed; the message says how."""


class _Cursor:
    """Little-endian reads from a buffer that fail cleanly at its end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > self.end:
            raise _Bad(f"header ends early at byte {self.pos} (file truncated?)")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def u64(self) -> int:
        return self.unpack("<Q")[0]

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise _Bad(f"{what} of {n} bytes at byte {self.pos} runs past the end (truncated?)")
        self.pos += n

    def string(self, what: str) -> str:
        n = self.u64()
        start = self.pos
        self.skip(n, what)
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")


def _skip_array(cur: _Cursor, key: str) -> None:
    elem_type, count = cur.u32(), cur.u64()
    if elem_type in _SCALARS:
        cur.skip(count * struct.calcsize(_SCALARS[elem_type]), f"array {key!r}")
    elif elem_type == _STRING:
        if count > (cur.end - cur.pos) // 8:
            raise _Bad(f"array {key!r} of {count} strings runs past the end (truncated?)")
        for _ in range(count):
            cur.skip(cur.u64(), f"a string of array {key!r}")
    elif elem_type == _ARRAY:  # llama.cpp's reader refuses them: the model never loads
        raise _Bad(f"array {key!r} holds arrays, which llama.cpp cannot read")
    else:
        raise _Bad(f"array {key!r} has unknown element type {elem_type}")


def _read_kv(cur: _Cursor) -> tuple[str, Scalar | None]:
    key = cur.string("a key")
    value_type = cur.u32()
    if value_type in _SCALARS:
        return key, cur.unpack(_SCALARS[value_type])[0]
    if value_type == _STRING:
        return key, cur.string(f"value of {key!r}")
    if value_type == _ARRAY:
        _skip_array(cur, key)
        return key, None
    raise _Bad(f"key {key!r} has unknown value type {value_type}")


@dataclass(frozen=True)
class _Tensor:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


def _read_tensor(cur: _Cursor) -> _Tensor:
    name = cur.string("a tensor name")
    n_dims = cur.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Bad(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS} allowed)")
    dims = tuple(cur.u64() for _ in range(n_dims))
    ggml_type, offset = cur.u32(), cur.u64()
    return _Tensor(name, dims, ggml_type, offset)


def _nbytes(tensor: _Tensor) -> int | None:
    """Bytes of tensor data, or ``None`` for a ggml type we do not know."""
    try:
        block, type_size = GGML_BLOCKS[tensor.ggml_type]
    except KeyError:
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    if tensor.dims[0] % block:
        raise _Bad(f"tensor {tensor.name!r} row of {tensor.dims[0]} is not a whole block")
    return count // block * type_size


def _check_tensors(tensors: Sequence[_Tensor], data_offset: int, size: int, align: int) -> int:
    """Every tensor inside the file, aligned; returns where the last one ends."""
    data_end = data_offset
    for tensor in tensors:
        if tensor.offset % align:
            raise _Bad(f"tensor {tensor.name!r} offset {tensor.offset} is not {align}-aligned")
        start = data_offset + tensor.offset
        nbytes = _nbytes(tensor) or 0
        end = start + nbytes
        if end > size or start > size:
            raise _Bad(
                f"tensor {tensor.name!r} data ends at byte {end} but the file has only "
                f"{size} bytes: the file is truncated (an interrupted download or copy)"
            )
        data_end = max(data_end, end)
    return data_end


def _parse(path: Path, buf: mmap.mmap, size: int) -> GgufInfo:
    cur = _Cursor(buf)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise _Bad(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"GGUF version {version} is not supported (llama-server reads 2 and 3)")
    tensor_count, kv_count = cur.u64(), cur.u64()
    if kv_count > size or tensor_count > size:
        raise _Bad(f"header claims {kv_count} keys and {tensor_count} tensors: garbage header")
    metadata: dict[str, Scalar] = {}
    for _ in range(kv_count):
        key, value = _read_kv(cur)
        if value is not None:
            metadata[key] = value
    tensors = [_read_tensor(cur) for _ in range(tensor_count)]
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Bad(f"general.alignment = {align!r} is not a power of two")
    data_offset = -(-cur.pos // align) * align
    data_end = _check_tensors(tensors, data_offset, size, align)
    return GgufInfo(
        path=path,
        size=size,
        version=version,
        tensor_count=tensor_count,
        kv_count=kv_count,
        alignment=align,
        data_offset=data_offset,
        data_end=data_end,
        architecture=_text(metadata, "general.architecture"),
        name=_text(metadata, "general.name"),
        split_no=_int(metadata, "split.no"),
        split_count=_int(metadata, "split.count"),
        split_tensors_count=_int(metadata, "split.tensors.count"),
        metadata=metadata,
    )


def _text(metadata: Mapping[str, Scalar], key: str) -> str | None:
    value = metadata.get(key)
    return value if isinstance(value, str) else None


def _int(metadata: Mapping[str, Scalar], key: str) -> int | None:
    value = metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def diagnose_gguf(path: Path) -> tuple[GgufInfo | None, str | None]:
    """``(info, None)`` for a usable GGUF, ``(None, problem)`` for a damaged one.

    A missing or unreadable file is not "damaged": it raises ``ModelNotFound`` / ``ModelError``.
    """
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size < 24:
                return None, f"{size} bytes is too small to hold a GGUF header"
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    return _parse(path, buf, size), None
                except _Bad as exc:
                    return None, f"{exc} ({size} bytes on disk)"
    except FileNotFoundError:
        raise ModelNotFound(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelError(f"cannot read {path}: permission denied") from None
    except OSError as exc:  # a link loop, EIO, a stale NFS handle, a mount mmap refuses
        raise cannot_read(path, exc) from None


def cannot_read(path: Path, exc: OSError) -> ModelError:
    """A model file the system would not let us read, said as the model's error."""
    return ModelError(f"cannot read {path}: {exc.strerror or exc}")


def verify_gguf(path: Path) -> GgufInfo:
    """Parse the header and bounds-check the tensors; raise ``ModelCorrupt`` if unusable."""
    info, problem = diagnose_gguf(path)
    if info is None:
        raise ModelCorrupt(
            f"{path} is not a usable GGUF: {problem}. Delete or replace it "
            f"(`orion-llamaccp fetch` downloads it again when the profile names hf_repo_id)"
        )
    return info


def verify_split_set(infos: Sequence[GgufInfo]) -> None:
    """The parts of a split GGUF agree on their count, order and total tensor count."""
    if len(infos) < 2:
        return
    first = infos[0]
    for index, info in enumerate(infos):
        if info.split_count != len(infos) or info.split_no != index:
            raise ModelCorrupt(
                f"{info.path} says it is part {info.split_no} of {info.split_count}, but the "
                f"file name makes it part {index} of {len(infos)} (0-based): the parts do not "
                f"belong together; download them again from one revision"
            )
    total = sum(info.tensor_count for info in infos)
    if first.split_tensors_count is not None and first.split_tensors_count != total:
        raise ModelCorrupt(
            f"{first.path} announces {first.split_tensors_count} tensors across "
            f"{len(infos)} parts, the parts hold {total}: download the parts again"
        )


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's sha256 (reads it all); ``on_bytes`` is told the running count."""
    digest = hashlib.sha256()
    done = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                if on_bytes is not None:
                    on_bytes(done)
    except OSError as exc:
        raise cannot_read(path, exc) from None
    return digest.hexdigest()
