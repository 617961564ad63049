"""Prepared samples as flat arrays on disk, memory-mapped on load.

A store directory holds, for N samples and T tokens in total:

    token_ids.bin   int32[T]    every sample's token ids, back to back
    loss_mask.bin   uint8[T]    aligned loss masks (1 = supervised)
    offsets.bin     int64[N+1]  sample k is [offsets[k], offsets[k+1])
    rows.bin        int64[N]    source row of each sample
    turns.bin       int32[N]    supervised message of a per-turn sample, else -1
    truncated.bin   uint8[N]    1 when the sample was cut to the max length
    <extra>.bin                 arrays the caller adds (the JSONL row index)
    meta.json                   dtypes and lengths of the above + the caller's metadata

`StoreWriter` appends chunks and writes ``meta.json`` last; `TokenStore.open` checks every
file against it, so a directory whose writer died midway never opens. Opening maps the
files and reads nothing else. A sample's tokens are then read with ``pread`` (two small
reads), not through the mapping: touching a mapped page maps its whole page-cache folio
(with 8 MB readahead, about 1 MB per random sample measured here), so a process serving
shuffled batches would see its RSS climb to the size of the token file over an epoch.
Read by offset, memory stays flat whatever the corpus size; the page cache still keeps
hot data in memory for everyone.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field

import numpy as np

__all__ = ["StoreError", "StoreWriter", "TokenStore"]

META = "meta.json"
TOKEN_ARRAYS = {"token_ids": np.int32, "loss_mask": np.uint8}
SAMPLE_ARRAYS = {"rows": np.int64, "turns": np.int32, "truncated": np.uint8}


class StoreError(ValueError):
    """A store directory that is incomplete or inconsistent (never used as data)."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Appends samples chunk by chunk; `close` makes the directory a complete store."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        # Token data can be large: it streams to disk. Per-sample arrays are small (a few
        # bytes a sample) and are written once at the end.
        self._files = {name: open(os.path.join(directory, f"{name}.bin"), "wb") for name in TOKEN_ARRAYS}
        self._counts = dict.fromkeys(TOKEN_ARRAYS, 0)
        self._per_sample = {name: [] for name in (*SAMPLE_ARRAYS, "lengths")}
        self._extra: dict[str, np.ndarray] = {}

    def append(self, token_ids: np.ndarray, loss_mask: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
               turns: np.ndarray, truncated: np.ndarray) -> None:
        """Add samples: ``token_ids``/``loss_mask`` are their sequences concatenated."""
        if len(token_ids) != len(loss_mask) or len(token_ids) != int(np.sum(lengths)):
            raise StoreError("token ids, loss mask and sample lengths disagree")
        for name, arr in (("token_ids", token_ids), ("loss_mask", loss_mask)):
            arr = np.ascontiguousarray(arr, dtype=TOKEN_ARRAYS[name])
            self._files[name].write(memoryview(arr).cast("B"))
            self._counts[name] += len(arr)
        for name, arr in (("lengths", lengths), ("rows", rows), ("turns", turns), ("truncated", truncated)):
            self._per_sample[name].append(np.asarray(arr))

    def add_array(self, name: str, arr: np.ndarray) -> None:
        """An extra named array stored alongside (e.g. the JSONL row index)."""
        if name in TOKEN_ARRAYS or name in SAMPLE_ARRAYS or name == "offsets":
            raise StoreError(f"{name!r} is a reserved store array")
        self._extra[name] = np.asarray(arr)

    def _write_array(self, name: str, arr: np.ndarray, arrays: dict) -> None:
        with open(os.path.join(self.directory, f"{name}.bin"), "wb") as f:
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        arrays[name] = {"dtype": arr.dtype.str, "length": len(arr)}

    def close(self, meta: dict) -> None:
        """Flush everything to disk, then write ``meta.json`` (the completion marker)."""
        arrays: dict[str, dict] = {}
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            arrays[name] = {"dtype": np.dtype(TOKEN_ARRAYS[name]).str, "length": self._counts[name]}
        cat = {name: (np.concatenate(parts) if parts else np.zeros(0)) for name, parts in self._per_sample.items()}
        offsets = np.zeros(len(cat["lengths"]) + 1, dtype=np.int64)
        np.cumsum(cat["lengths"], out=offsets[1:])
        self._write_array("offsets", offsets, arrays)
        for name, dtype in SAMPLE_ARRAYS.items():
            self._write_array(name, cat[name].astype(dtype, copy=False), arrays)
        for name, arr in self._extra.items():
            self._write_array(name, arr, arrays)
        tmp = os.path.join(self.directory, META + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**meta, "arrays": arrays}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, META))
        _fsync_dir(self.directory)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()


def _map(path: str, dtype: str, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


@dataclass
class TokenStore:
    """Read-only, memory-mapped view of a complete store directory."""

    directory: str
    meta: dict
    arrays: dict[str, np.ndarray]
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str) -> TokenStore:
        """Map ``directory``; raises `StoreError` unless every file matches ``meta.json``."""
        try:
            with open(os.path.join(directory, META), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{directory}: no readable {META} (incomplete store): {e}") from None
        arrays = {}
        for name, spec in meta.get("arrays", {}).items():
            path = os.path.join(directory, f"{name}.bin")
            want = spec["length"] * np.dtype(spec["dtype"]).itemsize
            try:
                size = os.path.getsize(path)
            except OSError:
                size = -1
            if size != want:
                raise StoreError(f"{path}: {size} bytes on disk, {want} expected (incomplete store)")
            arrays[name] = _map(path, spec["dtype"], spec["length"])
        missing = sorted({*TOKEN_ARRAYS, *SAMPLE_ARRAYS, "offsets"} - set(arrays))
        if missing:
            raise StoreError(f"{directory}: arrays {missing} missing (incomplete store)")
        n = len(arrays["rows"])
        if len(arrays["offsets"]) != n + 1 or int(arrays["offsets"][-1]) != len(arrays["token_ids"]):
            raise StoreError(f"{directory}: offsets do not match the token arrays")
        return cls(directory, meta, arrays)

    def __len__(self) -> int:
        return len(self.arrays["rows"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def span(self, k: int) -> tuple[int, int]:
        offsets = self.arrays["offsets"]
        return int(offsets[k]), int(offsets[k + 1])

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(os.path.join(self.directory, f"{name}.bin"), os.O_RDONLY)
            weakref.finalize(self, os.close, fd)
        return fd

    def tokens(self, k: int) -> tuple[list[int], list[int]]:
        """(token ids, loss mask) of sample ``k`` as Python lists (read by offset, see the module doc)."""
        a, b = self.span(k)
        n = b - a
        ids = os.pread(self._fd("token_ids"), 4 * n, 4 * a)
        mask = os.pread(self._fd("loss_mask"), n, a)
        if len(ids) != 4 * n or len(mask) != n:
            raise StoreError(f"{self.directory}: sample {k} lies past the end of the token files")
        return np.frombuffer(ids, dtype=np.int32).tolist(), list(mask)

    def lengths(self) -> np.ndarray:
        return np.diff(self.arrays["offsets"])

    def __getstate__(self):  # pickles as its path (a memmap would pickle as a full copy)
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.__dict__.update(TokenStore.open(state["directory"]).__dict__)
