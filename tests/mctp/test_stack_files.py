"""MCTPStack.save_pretrained / from_pretrained (offline, bit-exact) and push_to_hub (no network)."""

from __future__ import annotations

import json

import pytest
import torch

from mctp import CheckpointError, MCTPStack, generate
from mctp.backbones import HFBackbone
from mctp.interleave import InterleaveSchedule


@pytest.fixture
def model(tiny_hf):
    bb = HFBackbone(tiny_hf("qwen2"))
    stack = MCTPStack.from_backbone(bb.parts(), 3, output_vocab=range(90, 128))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return bb, stack.eval()


def test_round_trip_is_bit_exact(model, tmp_path):
    bb, stack = model
    folder = stack.save_pretrained(tmp_path / "heads")
    assert sorted(p.name for p in folder.iterdir()) == ["mctp_config.json", "model.safetensors"]
    config = json.loads((folder / "mctp_config.json").read_text())
    assert config["num_heads"] == 3 and config["output_vocab"] == list(range(90, 128))
    loaded = MCTPStack.from_pretrained(folder, bb.parts())
    want, got = stack.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert torch.equal(loaded.output_vocab.index, stack.output_vocab.index)
    ids = torch.randint(3, 90, (1, 6))
    three = InterleaveSchedule.from_ratio([1, 3])
    a = generate(bb, stack, ids, three, 12)
    b = generate(bb, loaded, ids, three, 12)
    assert torch.equal(a.sequences, b.sequences)
    # shared backbone modules are not part of the file
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert all(k.startswith("heads.") for k in f.keys())


def test_loading_checks_what_it_reads(model, tiny_hf, tmp_path):
    bb, stack = model
    folder = stack.save_pretrained(tmp_path)
    bigger = HFBackbone(tiny_hf("qwen2", vocab=256))
    with pytest.raises(
        ValueError, match="stored heads score 128 tokens, the backbone's lm_head 256"
    ):
        MCTPStack.from_pretrained(folder, bigger.parts())
    parts = bb.parts()
    parts.hidden_size = 64
    with pytest.raises(ValueError, match="stored heads are 32 wide, the backbone is 64"):
        MCTPStack.from_pretrained(folder, parts)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError):
        MCTPStack.from_pretrained(folder, bb.parts())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no mctp_config"):
        MCTPStack.from_pretrained(tmp_path / "empty", bb.parts())


def test_push_to_hub_saves_and_uploads_without_network(model, monkeypatch):
    """push_to_hub creates the repo and uploads exactly what save_pretrained writes (the
    hub client is replaced: no network in tests)."""
    import huggingface_hub

    _, stack = model
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, *, repo_id, folder_path, revision, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = stack.push_to_hub("me/heads", private=True, token="t")
    assert url == "https://hub/me/heads/commit/1"
    assert calls == {
        "token": "t",
        "repo": ("me/heads", True, True),
        "files": ["mctp_config.json", "model.safetensors"],
    }


def test_push_to_hub_offline_raises_cleanly(model, monkeypatch):
    """With the hub client in offline mode the call fails with the client's own error."""
    import huggingface_hub

    _, stack = model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match=r"(?i)offline"):
        stack.push_to_hub("me/heads", token="t")


def test_bad_folders_and_configs_name_the_path(model, tmp_path, monkeypatch):
    """A missing local folder is not sent to the Hub as a repo id; a config that is not JSON,
    not an object or incomplete is named (issue 16)."""
    import huggingface_hub

    bb, stack = model
    missing = tmp_path / "no_such_heads"
    with pytest.raises(FileNotFoundError, match=rf"no folder {missing}.*not a Hugging Face Hub"):
        MCTPStack.from_pretrained(missing, bb.parts())

    def hub_says_no(name, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"404: {name} not found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_says_no)
    monkeypatch.chdir(tmp_path)  # "org/heads" is a valid repo id and a relative path
    with pytest.raises(
        FileNotFoundError, match=rf"no folder {tmp_path}/org/heads, and the Hub .*'org/heads'.*404"
    ):
        MCTPStack.from_pretrained("org/heads", bb.parts())
    folder = stack.save_pretrained(tmp_path / "heads")
    with pytest.raises(NotADirectoryError, match=r"model\.safetensors is a file"):
        MCTPStack.from_pretrained(folder / "model.safetensors", bb.parts())
    config = folder / "mctp_config.json"
    good = config.read_text()
    for text, pattern in (
        ("{not json", r"mctp_config\.json is not valid JSON"),
        (b"\xff\xfe\x00", r"mctp_config\.json is not valid JSON"),
        ("[1, 2]", r"mctp_config\.json is not an MCTP stack config"),
        ('{"format": "mctp-stack"}', r"mctp_config\.json lacks \['hidden_size'"),
    ):
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=pattern) as info:
            MCTPStack.from_pretrained(folder, bb.parts())
        assert str(folder) in str(info.value)
    config.write_text(good)
    assert MCTPStack.from_pretrained(folder, bb.parts()).num_heads == 3
