"""Random access to the rows of an SFT file without loading it into Python objects.

* ``.parquet`` and ``datasets.save_to_disk`` directories: a memory-mapped Arrow dataset
  (HF ``datasets``). Arrow cannot tell a missing key from a null one and fills absent struct
  fields with nulls, so null values are dropped from rows read this way; it also orders
  object keys by the column schema, which changes ``tojson`` renders of tools and dict
  arguments. Keep tools and tool-call arguments as JSON strings there to render them as written.
* ``.jsonl``: an index of line byte offsets (8 bytes a row) and ``json.loads`` on access.
  We do not route JSONL through Arrow because its schema inference rejects or rewrites rows
  whose nested objects differ in shape (tool arguments, tool schemas), which real chat data does.
* ``.json``: a top-level list, parsed once (JSON arrays cannot be indexed lazily; use JSONL or
  Parquet for large data).
"""

from __future__ import annotations

import json
import os
from array import array
from typing import Any, Protocol

import numpy as np

__all__ = ["RowSource", "open_rows"]


class RowSource(Protocol):
    path: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...

    def where(self, i: int) -> str:
        """Human-readable location of row ``i`` (for error messages)."""
        ...


class RowReadError(ValueError):
    """A row that cannot even be parsed (the caller reports file/row)."""


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


class JsonlRows:
    """``index``: the arrays `index_arrays` returned for this same file content (a cache hit
    reuses them instead of scanning a large file again)."""

    def __init__(self, path: str, index: dict[str, np.ndarray] | None = None):
        self.path = path
        self._fh = None
        if index is not None:
            self._offsets, self._lines = index["row_offsets"], index["row_lines"]
            return
        offsets, lines = array("q"), array("q")
        pos = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(lineno)
                pos += len(line)
        self._offsets = np.frombuffer(offsets, dtype=np.int64)
        self._lines = np.frombuffer(lines, dtype=np.int64)

    def index_arrays(self) -> dict[str, np.ndarray]:
        return {"row_offsets": self._offsets, "row_lines": self._lines}

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> Any:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(int(self._offsets[i]))
        line = self._fh.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise RowReadError(f"invalid JSON ({e.msg} at column {e.colno})") from None

    def where(self, i: int) -> str:
        return f"row {i} (line {self._lines[i]})"

    def __getstate__(self):  # picklable (Ray, worker processes): reopen the file lazily on the other side
        state = self.__dict__.copy()
        state["_fh"] = None
        # Memory-mapped index arrays would pickle as copies anyway; plain arrays are explicit.
        state["_offsets"], state["_lines"] = np.array(self._offsets), np.array(self._lines)
        return state


class JsonListRows:
    def __init__(self, path: str):
        self.path = path
        with open(path, encoding="utf-8-sig") as f:  # tolerate a byte-order mark
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of rows, got {type(data).__name__}")
        self._rows = data

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Any:
        return self._rows[i]

    def where(self, i: int) -> str:
        return f"row {i}"


class ArrowRows:
    def __init__(self, path: str, dataset: Any):
        self.path = path
        self._ds = dataset

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> Any:
        return _drop_nulls(self._ds[int(i)])

    def where(self, i: int) -> str:
        return f"row {i}"


def _load_arrow(path: str) -> Any:
    import datasets

    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return ds
    return datasets.Dataset.from_parquet(path)


def open_rows(path: str, index: dict[str, np.ndarray] | None = None) -> RowSource:
    """Open ``path`` (.jsonl, .json, .parquet or a save_to_disk directory) for random access.

    ``index``: a JSONL row index saved from an earlier open of the same content (ignored
    for the other formats, which need no scan).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        return ArrowRows(path, _load_arrow(path))
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return JsonlRows(path, index)
    if ext == ".json":
        return JsonListRows(path)
    if ext == ".parquet":
        return ArrowRows(path, _load_arrow(path))
    raise ValueError(f"{path}: unsupported data format {ext!r}; use .jsonl, .json, .parquet or a save_to_disk directory")
