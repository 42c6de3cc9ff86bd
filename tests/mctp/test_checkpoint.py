"""mctp.checkpoint.read_state_dict: every checkpoint layout it reads, and every way it fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mctp.checkpoint import CheckpointError, load_strict, read_state_dict


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "a.bias": torch.randn(3, generator=g),
        "b.weight": torch.randn(2, 3, generator=g),
        "c.scale": torch.randn(5, generator=g, dtype=torch.float64),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].device.type == "cpu"
        assert torch.equal(got[key], value), key


def _shard(folder: Path, state: dict[str, torch.Tensor], index_name: str) -> None:
    """Two safetensors shards (odd / even keys) and their index."""
    folder.mkdir()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / file))
    weight_map = {k: file for file, names in shards.items() for k in names}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_safetensors_file_and_keep(tmp_path: Path) -> None:
    state = _state()
    save_file(state, str(tmp_path / "w.safetensors"))
    _assert_same(read_state_dict(tmp_path / "w.safetensors"), state)
    kept = read_state_dict(str(tmp_path / "w.safetensors"), keep=lambda k: k.startswith("a."))
    _assert_same(kept, {k: v for k, v in state.items() if k.startswith("a.")})
    assert read_state_dict(tmp_path / "w.safetensors", keep=lambda k: False) == {}


def test_torch_files_plain_nested_and_legacy(tmp_path: Path) -> None:
    state = _state()
    torch.save(state, tmp_path / "plain.pt")
    _assert_same(read_state_dict(tmp_path / "plain.pt"), state)
    # training checkpoints nest the weights (FunASR: {"state_dict": ...}, others: "model")
    torch.save({"state_dict": {"model": state}, "epoch": 3}, tmp_path / "nested.pt")
    _assert_same(read_state_dict(tmp_path / "nested.pt"), state)
    # the legacy (non-zip) format cannot be memory-mapped and is read without mmap
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    _assert_same(read_state_dict(tmp_path / "legacy.bin"), state)
    kept = read_state_dict(tmp_path / "plain.pt", keep=lambda k: k.endswith("weight"))
    assert sorted(kept) == ["a.weight", "b.weight"]


def test_folder_layouts_and_preference(tmp_path: Path) -> None:
    state = _state()
    other = {"x": torch.zeros(2)}

    single = tmp_path / "single"
    single.mkdir()
    save_file(state, str(single / "model.safetensors"))
    torch.save(other, single / "pytorch_model.bin")  # model.safetensors wins
    _assert_same(read_state_dict(single), state)

    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(state, binary / "pytorch_model.bin")
    _assert_same(read_state_dict(binary), state)

    lone = tmp_path / "lone"
    lone.mkdir()
    save_file(state, str(lone / "adapter.safetensors"))
    (lone / "config.json").write_text("{}")
    _assert_same(read_state_dict(lone), state)

    _shard(tmp_path / "sharded", state, "model.safetensors.index.json")
    _assert_same(read_state_dict(tmp_path / "sharded"), state)

    # a sharded torch index: its shards are read with torch.load
    torch_shards = tmp_path / "torch_sharded"
    torch_shards.mkdir()
    torch.save({"a.weight": state["a.weight"]}, torch_shards / "part1.bin")
    torch.save({"a.bias": state["a.bias"]}, torch_shards / "part2.bin")
    index = {"weight_map": {"a.weight": "part1.bin", "a.bias": "part2.bin"}}
    (torch_shards / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _assert_same(read_state_dict(torch_shards), {k: state[k] for k in ("a.weight", "a.bias")})


def test_shards_without_kept_keys_are_not_opened(tmp_path: Path) -> None:
    state = _state()
    folder = tmp_path / "sharded"
    _shard(folder, state, "model.safetensors.index.json")
    first = sorted(state)[::2]  # the keys of shard 1
    (folder / "model-00002-of-00002.safetensors").unlink()
    kept = read_state_dict(folder, keep=lambda k: k in first)
    _assert_same(kept, {k: state[k] for k in first})
    with pytest.raises(FileNotFoundError, match=r"missing: \['model-00002-of-00002"):
        read_state_dict(folder)


def test_missing_paths_and_folders_without_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "absent_folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*config\.json"):
        read_state_dict(empty)
    two = tmp_path / "two"
    two.mkdir()
    save_file({"x": torch.zeros(1)}, str(two / "a.safetensors"))
    save_file({"y": torch.zeros(1)}, str(two / "b.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no weights in .*a\.safetensors.*b\.safetensors"):
        read_state_dict(two)


def test_unreadable_files_and_indexes(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*bad\.safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*bad\.pt"):
        read_state_dict(tmp_path / "bad.pt")
    # weights_only refuses arbitrary objects
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint file"):
        read_state_dict(tmp_path / "unsafe.pt")

    folder = tmp_path / "index"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        read_state_dict(folder)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        read_state_dict(folder)


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict, got list"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "step": 7, "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="not tensors") as err:
        read_state_dict(tmp_path / "mixed.pt")
    assert err.value.unexpected == ["lr", "step"]


def test_key_in_two_shards(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"x": torch.zeros(1), "y": torch.ones(1)}, str(folder / "s1.safetensors"))
    save_file({"y": torch.ones(1)}, str(folder / "s2.safetensors"))
    index = {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"more than one shard: \['y'\]"):
        read_state_dict(folder)


def test_result_loads_strictly(tmp_path: Path) -> None:
    module = nn.Linear(4, 3)
    state = {k: v.clone() + 1 for k, v in module.state_dict().items()}
    torch.save(state, tmp_path / "linear.pt")
    fresh = nn.Linear(4, 3)
    load_strict(fresh, read_state_dict(tmp_path / "linear.pt"))
    assert torch.equal(fresh.weight, state["weight"]) and torch.equal(fresh.bias, state["bias"])
