"""--prompt-data formats: .jsonl, .json, .parquet and save_to_disk give the same samples."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, TINY_DATA, write_jsonl
from slime.data.config import SFTDataConfig, build_data_source
from slime.data.readers import open_rows

ROWS = [json.loads(line) for line in open(TINY_DATA, encoding="utf-8")][:12]


def samples(path):
    src = build_data_source(SFTDataConfig(prompt_data=str(path), hf_checkpoint=str(TINY)), progress=False)
    return [(s.tokens, s.loss_mask) for s in src.get_samples(len(src))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("ref") / "data.jsonl", ROWS)
    return samples(path)


def _as_arrow_friendly(rows):
    # Arrow needs one schema per column: keep tools and tool arguments as JSON strings.
    out = []
    for row in rows:
        row = json.loads(json.dumps(row))
        for m in row["messages"]:
            for c in m.get("tool_calls", []):
                if isinstance(c["function"]["arguments"], dict):
                    c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
        # Dataset.from_list takes its columns from the first row: give every row a tools cell.
        row["tools"] = json.dumps(row["tools"]) if "tools" in row else None
        out.append(row)
    return out


def test_json_list(tmp_path, reference):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    assert samples(path) == reference


def test_jsonl_blank_lines_ignored(tmp_path, reference):
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + "\n\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert samples(path) == reference
    assert open_rows(str(path)).where(1) == "row 1 (line 4)"


def test_parquet_and_save_to_disk(tmp_path, reference):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_as_arrow_friendly(ROWS))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert samples(tmp_path / "data.parquet") == reference
    assert samples(tmp_path / "saved") == reference
    # Arrow fills keys absent in a row with nulls; they are dropped on read.
    row = open_rows(str(tmp_path / "data.parquet"))[1]
    assert all(v is not None for m in row["messages"] for v in m.values())


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data format '.csv'"):
        open_rows(str(path))


def test_json_must_be_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"messages": []}')
    with pytest.raises(ValueError, match="must hold a list of rows"):
        open_rows(str(path))
