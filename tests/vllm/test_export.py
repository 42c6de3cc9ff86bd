"""``mctp export vllm`` and the plugin's refusals: heads that do not fit the target, backbone
families the drafter cannot map, draft lengths beyond the heads, vLLM releases off the pin."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (run .ci/vllm for the vLLM tests)")

from vllm_helpers import NUM_HEADS, close_llm, make_llm


def _tensors(folder):
    from mctp.vllm.export import read_folder_tensors

    return read_folder_tensors(folder)


def _edited_backbone(src, dst, **fields):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_official_folder_and_stack_folder_export_the_same_heads(vita_built, tmp_path):
    from mctp.cli import main

    vita_built.stack.save_pretrained(tmp_path / "heads")
    rc = main(
        [
            "export",
            "vllm",
            "--heads",
            str(tmp_path / "heads"),
            "--backbone",
            str(vita_built.model_dir),
            "--out",
            str(tmp_path / "draft"),
        ]
    )
    assert rc == 0
    a, b = _tensors(vita_built.draft_dir), _tensors(tmp_path / "draft")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["norm.weight"], vita_built.backbone.model.model.norm.weight)
    cfg = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert cfg["model_type"] == "mtp" and cfg["num_nextn_predict_layers"] == NUM_HEADS
    assert cfg["mctp_family"] == "qwen2" and cfg["mctp_backbone_layers"] == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_size": 96}, "hidden_size 64, the backbone"),
        ({"vocab_size": 130}, "vocab_size 128, the backbone"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"intermediate_size": 100}, r"mlp.gate_proj.weight is \(128, 64\), the backbone needs"),
    ],
)
def test_export_refuses_heads_that_do_not_fit(qwen2_built, tmp_path, fields, message):
    from mctp.vllm.export import DrafterExportError, export_drafter

    bb = _edited_backbone(qwen2_built.model_dir, tmp_path / "bb", **fields)
    with pytest.raises(DrafterExportError, match=message):
        export_drafter(qwen2_built.heads_dir, tmp_path / "out", backbone=bb)


def test_export_refuses_wrong_family_and_head_count(qwen2_built, llama_built, tmp_path):
    from mctp.cli import main
    from mctp.vllm.export import DrafterExportError, export_drafter

    with pytest.raises(DrafterExportError, match="LlamaDecoderLayer blocks"):
        export_drafter(qwen2_built.heads_dir, tmp_path / "o", backbone=llama_built.model_dir)
    with pytest.raises(DrafterExportError, match=r"num_heads must be in \[1, 3\], got 4"):
        export_drafter(
            qwen2_built.heads_dir, tmp_path / "o", backbone=qwen2_built.model_dir, num_heads=4
        )
    with pytest.raises(DrafterExportError, match="pass the backbone folder"):
        export_drafter(qwen2_built.heads_dir, tmp_path / "o")
    assert (
        main(
            ["export", "vllm", "--heads", str(qwen2_built.heads_dir), "--out", str(tmp_path / "o")]
        )
        == 2
    )


def test_plugin_refuses_drafters_that_do_not_fit_the_target():
    from mctp.vllm.drafter import _check_fit, _layer_config
    from mctp.vllm.target import backbone_layers

    def config(hidden=64, vocab=128, k=3):
        return SimpleNamespace(
            model_config=SimpleNamespace(
                hf_text_config=SimpleNamespace(hidden_size=hidden, vocab_size=vocab)
            ),
            speculative_config=SimpleNamespace(num_speculative_tokens=k),
        )

    draft = SimpleNamespace(hidden_size=64, vocab_size=128, num_nextn_predict_layers=3)
    assert _check_fit(draft, config()) == 3
    with pytest.raises(ValueError, match="hidden_size 64 but the target model has 96"):
        _check_fit(draft, config(hidden=96))
    with pytest.raises(ValueError, match="vocab_size 128 but the target model has 100"):
        _check_fit(draft, config(vocab=100))
    with pytest.raises(ValueError, match="num_speculative_tokens=4 but the MCTP drafter has 3"):
        _check_fit(draft, config(k=4))
    with pytest.raises(ValueError, match="backbone family 'gpt2'"):
        _layer_config(SimpleNamespace(mctp_family="gpt2", to_dict=lambda: {}))
    with pytest.raises(ValueError, match="VITA-Audio-Plus"):
        backbone_layers(SimpleNamespace(model_type="qwen2_mtp_sensevoice"))


def test_vllm_version_pin():
    import vllm

    from mctp.vllm import VLLM_VERSION, check_vllm_version

    assert check_vllm_version() == vllm.__version__  # the lock installs the pinned release
    with pytest.raises(RuntimeError, match=r"pinned to vLLM 0\.32\.0.*vLLM 0\.33\.0 is installed"):
        check_vllm_version("0.33.0")
    assert VLLM_VERSION == "0.32.0"


def test_engine_refuses_more_drafts_than_heads(vita_built):
    """Through vLLM itself: the engine does not start, and the error names the mismatch."""
    from vllm.distributed import cleanup_dist_env_and_memory

    try:
        with pytest.raises(Exception, match="num_speculative_tokens=4 but the MCTP drafter has 3"):
            close_llm(make_llm(vita_built.model_dir, vita_built.draft_dir, k=4))
    finally:
        cleanup_dist_env_and_memory()
