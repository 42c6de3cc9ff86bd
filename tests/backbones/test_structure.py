"""mctp.backbones.structure: the final norm (and projection) before the lm_head, read from the
model's structure for every family of the table; one clear error where heads cannot attach."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mctp.backbones import HFBackbone
from mctp.backbones.structure import is_norm, output_path

sys.path.insert(0, str(Path(__file__).parent))
from families import FAMILIES, VOCAB, build

EXPECTED = {
    "llama": ["model.norm"],
    "gemma2": ["model.norm"],
    "gpt2": ["transformer.ln_f"],
    "gpt-neox": ["gpt_neox.final_layer_norm"],
    "falcon": ["transformer.ln_f"],
    "phi": ["model.final_layernorm"],
    "opt": ["model.decoder.final_layer_norm"],
    "opt-project-out": [
        "model.decoder.project_in",
        "model.decoder.final_layer_norm",
        "model.decoder.project_out",
    ],
    "bart-decoder": ["model.decoder.layers.1.final_layer_norm"],
    "gptj": ["transformer.ln_f"],
}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _lm_head_input(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    h = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("family", list(EXPECTED))
def test_the_output_path_is_found_from_the_structure(family):
    model = build(family)
    model.train()  # the probe runs in eval mode and restores every flag
    path = output_path(model)
    assert all(m.training for m in model.modules())
    assert path.names == EXPECTED[family]
    assert is_norm(path.norm)
    assert path.width == model.get_output_embeddings().weight.shape[1]
    assert (path.projection is None) == (family != "opt-project-out")


@pytest.mark.parametrize("family", ["opt", "opt-project-out", "bart-decoder", "gptj"])
def test_the_heads_end_the_way_the_backbone_ends(family):
    """parts().norm applied to what the final norm read gives exactly the lm_head's input (with
    a width-changing projection: the backbone's own project_in -> norm -> project_out, shared),
    and heads of the lm_head's width attach (the projection case runs them at width 16)."""
    from mctp import MCTPStack

    model = build(family).eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    path = output_path(model)
    inputs = []
    h = path.norm.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    try:
        target = _lm_head_input(model, ids)
    finally:
        h.remove()
    bb = HFBackbone(model)
    parts = bb.parts()
    with torch.no_grad():
        if path.input_projection is None:
            torch.testing.assert_close(parts.norm(inputs[0]), target, rtol=1e-5, atol=1e-5)
        else:  # the heads' states live in the lm_head's width: into the decoder's and back
            dec = model.model.decoder
            assert list(parts.norm) == [dec.project_in, dec.final_layer_norm, dec.project_out]
            torch.testing.assert_close(
                dec.project_out(dec.final_layer_norm(inputs[0])), target, rtol=1e-5, atol=1e-5
            )
    assert parts.hidden_size == path.width == (16 if family == "opt-project-out" else 32)
    stack = MCTPStack.from_backbone(parts, 2)
    hidden = bb(ids).hidden
    out = stack(hidden, ids, labels=ids)
    assert out.loss_sums.shape == (2,) and bool(torch.isfinite(out.loss_sums).all())


def test_a_family_that_cannot_carry_heads_gets_one_error_naming_it():
    model = build("gpt2")
    model.transformer.ln_f = torch.nn.Identity()  # no norm before the lm_head at all
    bb = HFBackbone(model)  # generation still runs
    with pytest.raises(
        NotImplementedError,
        match=r"GPT2LMHeadModel cannot carry MCTP heads: the lm_head reads the output of "
        r"GPT2Block \('transformer.h.1'\), not of a normalisation module",
    ):
        bb.parts()
    model = build("gpt2")
    model.transformer.ln_f = torch.nn.Linear(32, 32)  # a projection, but of no norm
    with pytest.raises(
        NotImplementedError,
        match=r"GPT2LMHeadModel cannot carry MCTP heads: the projection 'transformer.ln_f' "
        r"before the lm_head reads GPT2Block",
    ):
        output_path(model)


def test_every_family_of_the_table_has_an_expected_path_or_the_fast_layout():
    """Families on the fast path use ``base.norm`` (the layout the fast loop runs); every
    generic family of the table is listed above, so a new one must state its path."""
    generic = {f for f, (_, _, _, path) in FAMILIES.items() if path == "generic"}
    assert generic <= set(EXPECTED)
