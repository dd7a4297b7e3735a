"""Read Hugging Face safetensors checkpoints by byte range.

A reader parses each shard's header once and then reads exactly the bytes of the tensors (or the
dim-0 rows, e.g. experts) it is asked for, counting them, so a worker can prove it never touched
weights it does not own. Single-file and sharded (`model.safetensors.index.json`) layouts both work.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return (self.end - self.begin) // max(rows, 1)


def _read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    infos = {}
    for key, h in header.items():
        if h["dtype"] not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {key!r} has unsupported dtype {h['dtype']}")
        b, e = h["data_offsets"]
        infos[key] = TensorInfo(path, DTYPES[h["dtype"]], tuple(h["shape"]), base + b, base + e)
    return infos


class CheckpointReader:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.dir / f for f in weight_map.values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.dir}")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{index.name} names {path.name}, which is missing from {self.dir}")
            self.tensors.update(_read_header(path))
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}

    def keys(self) -> set[str]:
        return set(self.tensors)

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.dir} has no tensor {key!r}") from None

    def read(self, key: str, rows: list[int] | None = None) -> torch.Tensor:
        """The whole tensor, or only the listed dim-0 rows (contiguous runs are read in one go)."""
        info = self.info(key)
        if rows is None:
            return self._read_range(info, info.begin, info.end).view(info.shape)
        if not rows:
            return torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        parts = []
        for first, last in _runs(rows):
            if not 0 <= first <= last < info.shape[0]:
                raise CheckpointError(f"rows {first}..{last} out of range for {key!r} {info.shape}")
            b = info.begin + first * info.row_bytes
            parts.append(self._read_range(info, b, b + (last - first + 1) * info.row_bytes))
        return torch.cat(parts).view(len(rows), *info.shape[1:])

    def _read_range(self, info: TensorInfo, begin: int, end: int) -> torch.Tensor:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buf = bytearray(end - begin)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = os.preadv(fd, [view[got:]], begin + got)
            if n <= 0:
                raise CheckpointError(f"{info.file.name} is truncated at byte {begin + got}")
            got += n
        self.bytes_read += len(buf)
        if not buf:
            return torch.empty(0, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """[3,4,5,9] -> [(3,5),(9,9)]; order is kept, so callers get rows in the order asked."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    return runs
