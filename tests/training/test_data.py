"""mctp.training.data: JSONL through datasets with file:line errors, greedy packing, packed rows."""

from __future__ import annotations

import json
import logging

import pytest

from mctp.training import DataError, ErrorLog, JsonlFile, PackedDataset, greedy_packs, scan_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}], "audios": ["a.wav"]}
OTHER = {"messages": [{"role": "user", "content": "yo"}]}


def _write(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_clean_file_through_datasets(tmp_path):
    f = _write(tmp_path / "a.jsonl", [json.dumps(GOOD).encode(), b"", json.dumps(OTHER).encode()])
    data = JsonlFile(f)
    assert len(data) == 2 and not data._raw  # the datasets json builder read it
    assert data[0] == GOOD and data[1] == OTHER  # keys Arrow added for OTHER are dropped
    assert data.where(1) == f"{f}:3"
    assert list(JsonlFile(f, streaming=True)) == [(f"{f}:1", GOOD), (f"{f}:3", OTHER)]


def test_malformed_lines_raise_or_are_skipped_with_file_and_line(tmp_path, caplog):
    lines = [json.dumps(GOOD).encode(), b"{not json", b"[1, 2]", json.dumps(OTHER).encode()]
    f = _write(tmp_path / "b.jsonl", lines)
    with pytest.raises(DataError, match=rf"{f}:2: invalid JSON"):
        JsonlFile(f)
    errors = ErrorLog("skip")
    with caplog.at_level(logging.WARNING, logger="mctp.training"):
        data = JsonlFile(f, errors=errors)
    assert [data[i] for i in range(len(data))] == [GOOD, OTHER] and data.where(1) == f"{f}:4"
    assert [e.split(": ")[0] for e in errors.skipped] == [f"{f}:2", f"{f}:3"]
    assert f"{f}:3" in caplog.text and "JSON object" in caplog.text
    assert errors.summary().startswith("skipped 2 malformed records")
    assert list(JsonlFile(f, errors=ErrorLog("skip"), streaming=True))[1] == (f"{f}:4", OTHER)


def test_invalid_utf8_names_file_and_line(tmp_path):
    f = _write(tmp_path / "c.jsonl", [json.dumps(GOOD).encode(), b'{"x": "caf\xe9"}'])
    with pytest.raises(DataError, match=rf"{f}:2: invalid UTF-8 \(byte 11"):
        scan_jsonl(f)
    with pytest.raises(DataError, match="invalid UTF-8"):
        JsonlFile(f, errors=ErrorLog("skip"))  # never skipped silently
    with pytest.raises(FileNotFoundError):
        scan_jsonl(tmp_path / "missing.jsonl")


def test_fields_changing_type_fall_back_to_raw_json(tmp_path):
    odd = {"messages": [{"role": "user", "content": 3}]}  # content not a string
    f = _write(tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), json.dumps(odd).encode()])
    data = JsonlFile(f)
    assert data[1] == odd and data[0] == GOOD


def test_greedy_packs_per_stream():
    packs, too_long = greedy_packs([3, 2, 4, 3, 9, 1], ["a", "b", "a", "a", "b", "b"], 6)
    assert too_long == [4]
    assert packs == [[0], [2], [1, 5], [3]]  # a: [3] closes, [4] closes; flush b then a
    with pytest.raises(ValueError, match="max_len"):
        greedy_packs([1], ["a"], 0)


def test_packed_dataset_rows():
    items = {
        0: {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        1: {"input_ids": [4, 5], "labels": [4, 5]},
    }
    ds = PackedDataset([[0, 1], [1]], items.__getitem__, max_len=7, pad_id=9)
    row = ds[0]
    assert row["input_ids"] == [1, 2, 3, 4, 5, 9, 9]
    assert row["labels"] == [-100, 2, 3, 4, 5, -100, -100]
    assert row["position_ids"] == [0, 1, 2, 0, 1, 2, 3]  # padding continues the last sample
    assert len(ds) == 2 and PackedDataset([[1]], items.__getitem__)[0]["position_ids"] == [0, 1]


def test_dataloader_workers_give_the_same_batches():
    import torch

    from mctp.training import PackedCollator

    items = {
        i: {
            "input_ids": list(range(i, i + 3 + i % 4)),
            "labels": [-100] * 2 + list(range(i + 2, i + 3 + i % 4)),
        }
        for i in range(12)
    }
    ds = PackedDataset([[i, i + 1] for i in range(0, 12, 2)], items.__getitem__, max_len=16)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=2, num_workers=workers, collate_fn=PackedCollator(flatten=False)
        )
        batches.append([{k: v.tolist() for k, v in b.items()} for b in loader])
    assert batches[0] == batches[1] and len(batches[0]) == 3
