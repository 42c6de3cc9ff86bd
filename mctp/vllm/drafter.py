"""MCTP heads as a vLLM ``mtp`` drafter that drafts in our cascade.

Head ``k`` at sequence position ``t`` reads head ``k-1``'s output at ``t-1`` (head 0 reads the
target's final-normed hidden state) and the token at ``t``, runs one decoder layer of the
backbone's family and the shared final norm; the target's lm_head scores it (see
:mod:`mctp.stack`). vLLM's stock MTP proposer runs its drafter once over the step's target
tokens and then ``k-1`` one-token steps with the drafter's own output fed back; it never runs
head ``k`` over the positions behind the frontier, so head ``k``'s KV cache would not hold what
our :class:`~mctp.MCTPDecoder` (and the teacher-forced training forward) computes. This module
keeps the stock proposer loop and does the cascade inside the model:

* step call 0 (the stock "first pass" over the target's tokens of this step): heads
  ``0..K-1`` each run over every one of those positions, head ``m`` reading head ``m-1``'s
  outputs at the previous positions;
* step call ``j >= 1`` (one token per request, the draft of head ``j-1``): heads ``j..K-1`` run
  at that one position; head ``j``'s output is what vLLM samples draft ``j+1`` from.

Every head keeps its keys/values and the hidden states it hands to the next head in buffers
indexed by vLLM's KV slot of each position (the block table of the step maps positions to
slots), so a step starting at position ``p`` finds head ``m-1``'s output at ``p-1`` from the
step before. Head ``m`` attends to positions ``t > m`` only, as in training (the training
forward and :class:`~mctp.MCTPDecoder` mask positions where ``h^m_{t-1}`` does not exist); that
is why attention runs here in torch over those buffers and not through vLLM's paged kernels.
The vLLM ``Attention`` modules inside the borrowed decoder layers only give the step's
attention metadata (block table, query starts); their own KV cache is allocated by vLLM and
left unused.

vLLM internals touched (pinned by :data:`mctp.vllm.VLLM_VERSION`):
``SpecDecodeBaseProposer.propose`` is wrapped to tell the drafter a step begins (and with how
many drafts); the forward context's per-layer attention metadata fields ``query_start_loc``,
``block_table``, ``slot_mapping`` and ``num_actual_tokens``; the proposer sharing the target's
``model.embed_tokens`` and ``lm_head`` with the drafter; the decoder-layer classes
``Qwen2DecoderLayer``/``LlamaDecoderLayer`` and their ``self_attn.qkv_proj``/``rotary_emb``/
``o_proj`` parts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mctp.layers import RMSNorm

__all__ = ["MCTPDrafterForCausalLM", "install_proposer_hook"]

_FAMILY_FIELDS_DROP = (
    "mctp_family",
    "mctp_head_rms_eps",
    "mctp_backbone_layers",
    "model_type",
    "architectures",
    "num_nextn_predict_layers",
    "auto_map",
)


def _layer_config(cfg: Any) -> Any:
    """A transformers config of the backbone family for vLLM's decoder-layer classes."""
    family = getattr(cfg, "mctp_family", None)
    fields = {k: v for k, v in cfg.to_dict().items() if k not in _FAMILY_FIELDS_DROP}
    fields.pop("transformers_version", None)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**fields)
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**fields)
    raise ValueError(
        f"the MCTP drafter config names backbone family {family!r}; the vLLM drafter maps "
        "'qwen2' and 'llama' (re-export the heads with `mctp export vllm`)"
    )


def _check_fit(cfg: Any, vllm_config: Any) -> int:
    """The drafter must fit the target and the requested draft length; returns K."""
    target = vllm_config.model_config.hf_text_config
    for name in ("hidden_size", "vocab_size"):
        mine, theirs = getattr(cfg, name), getattr(target, name, None)
        if mine != theirs:
            raise ValueError(
                f"the MCTP drafter has {name} {mine} but the target model has {theirs}: the "
                "heads were not trained on this target"
            )
    n = int(cfg.num_nextn_predict_layers)
    k = int(vllm_config.speculative_config.num_speculative_tokens)
    if not 1 <= k <= n:
        raise ValueError(
            f"num_speculative_tokens={k} but the MCTP drafter has {n} heads: each draft "
            f"position needs its own head (use 1..{n})"
        )
    return k


class _Head(nn.Module):
    """One MCTP head: the two input norms, the fusion projection and a vLLM decoder layer."""

    def __init__(self, layer: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.embed_norm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = layer


class _Placeholder(nn.Module):
    """Stands in for the target's embedding/lm_head until vLLM's proposer shares them."""


class MCTPDrafterForCausalLM(nn.Module):
    """vLLM model class of an ``mctp export vllm`` folder (see the module docstring).

    Args:
        vllm_config: vLLM's config; the drafter's own config is
            ``vllm_config.speculative_config.draft_model_config.hf_config``.
        prefix: Module name prefix given by vLLM.

    Raises:
        ValueError: If the heads do not fit the target (hidden size, vocabulary), the draft
            length exceeds the number of heads, or the backbone family cannot be mapped.
    """

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        cfg = vllm_config.speculative_config.draft_model_config.hf_config
        self.config = cfg
        self.num_drafts = _check_fit(cfg, vllm_config)
        layer_cfg = _layer_config(cfg)
        family = cfg.mctp_family
        start = int(getattr(vllm_config.model_config.hf_text_config, "num_hidden_layers", 0))
        hidden = int(cfg.hidden_size)
        eps = float(getattr(cfg, "mctp_head_rms_eps", 1e-6))
        heads = []
        for i in range(int(cfg.num_nextn_predict_layers)):
            name = f"{prefix + '.' if prefix else ''}model.layers.{start + i}"
            if family == "qwen2":
                from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

                layer = Qwen2DecoderLayer(
                    config=layer_cfg,
                    cache_config=vllm_config.cache_config,
                    quant_config=vllm_config.quant_config,
                    prefix=name,
                )
            else:
                from vllm.model_executor.models.llama import LlamaDecoderLayer

                layer = LlamaDecoderLayer(vllm_config=vllm_config, prefix=name, config=layer_cfg)
            heads.append(_Head(layer, hidden, eps))
        self.heads = nn.ModuleList(heads)
        self.norm = RMSNorm(hidden, float(layer_cfg.rms_norm_eps))
        self.model = _Placeholder()  # .embed_tokens: the target's, set by the proposer
        self.model.embed_tokens = _Placeholder()
        self.lm_head = _Placeholder()  # the target's, set by the proposer
        self.logits_processor = LogitsProcessor(int(cfg.vocab_size))
        self._call: int | None = None
        self._block_size = int(vllm_config.cache_config.block_size)
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._hidden: dict[int, torch.Tensor] = {}  # level m: h^m (head m-1's outputs) by slot

    # ------------------------------------------------------------------ vLLM interface
    def begin_step(self, num_speculative_tokens: int) -> None:
        """Called by the proposer hook before each propose(): the next forward is call 0."""
        self._call = 0

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (the target's table)."""
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0) -> torch.Tensor:
        """``[T, H]`` head outputs -> ``[T, V]`` logits through the target's lm_head."""
        return self.logits_processor(self.lm_head, hidden_states)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        spec_step_idx: int = 0,
    ) -> torch.Tensor:
        """One proposer call (see the module docstring for which heads run).

        Args:
            input_ids: ``[T]`` the token at each row's next position.
            positions: ``[T]`` vLLM positions (our slot minus one: row ``q`` pairs ``h_q``
                with ``x_{q+1}``).
            hidden_states: ``[T, H]`` the target's hidden states (call 0).
            intermediate_tensors: Unused (no pipeline parallelism).
            inputs_embeds: ``[T, H]`` precomputed embeddings, or None.
            spec_step_idx: Unused (the step is counted by the proposer hook).

        Returns:
            ``[T, H]`` the states vLLM samples the drafts from (head ``call``'s outputs).
        """
        from vllm.forward_context import get_forward_context

        call, self._call = self._call, None if self._call is None else self._call + 1
        meta = get_forward_context().attn_metadata
        if call is None or not meta or call >= self.num_drafts:
            return hidden_states  # profiling / dummy runs
        if isinstance(meta, list):
            meta = meta[0]
        md = meta[self.heads[0].layer.self_attn.attn.layer_name]
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        rows = int(md.num_actual_tokens)
        pos = positions[:rows].long()
        qsl = md.query_start_loc.to("cpu", torch.long)
        req = torch.repeat_interleave(torch.arange(qsl.numel() - 1), qsl[1:] - qsl[:-1]).to(
            pos.device
        )
        table = md.block_table.long()
        slots = self._slots(table, req, pos)
        mapped = md.slot_mapping[:rows].long()
        valid = mapped >= 0
        if not torch.equal(slots[valid], mapped[valid]):
            raise RuntimeError(
                "the MCTP drafter's slot arithmetic (block table x block size "
                f"{self._block_size}) differs from vLLM's slot mapping: this vLLM build lays "
                "out its KV blocks differently than the pinned release"
            )
        self._grow(table, hidden_states)
        out = hidden_states.new_zeros(hidden_states.shape)
        sample = None
        for m in range(call, self.num_drafts):
            head = self.heads[m]
            ok = pos >= m  # head m exists at our positions t = q + 1 > m
            if m == 0:
                prev = hidden_states[:rows]
            else:
                prev_slots = self._slots(table, req, (pos - 1).clamp(min=0))
                prev = self._hidden[m].index_select(0, prev_slots)
                prev = torch.where(ok[:, None], prev, torch.zeros_like(prev))
            x = head.proj(torch.cat((head.embed_norm(embeds[:rows]), head.hidden_norm(prev)), -1))
            y = self.norm(self._block(m, x, pos, req, table, slots, ok))
            if m + 1 < self.num_drafts:
                self._hidden[m + 1].index_copy_(0, slots[ok], y[ok])
            if m == call:
                sample = y
        out[:rows] = sample
        return out

    # ------------------------------------------------------------------ attention
    def _slots(self, table: torch.Tensor, req: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        bs = self._block_size
        return table[req, pos // bs] * bs + pos % bs

    def _grow(self, table: torch.Tensor, like: torch.Tensor) -> None:
        """Make the per-slot buffers cover every slot the block table can name."""
        need = (int(table.max()) + 1) * self._block_size
        have = next(iter(self._keys.values())).shape[0] if self._keys else 0
        if need <= have:
            return
        size = max(need, 2 * have)
        for m, head in enumerate(self.heads[: self.num_drafts]):
            attn = head.layer.self_attn
            shape = (size, attn.num_kv_heads, attn.head_dim)
            for store in (self._keys, self._values):
                new = like.new_zeros(shape)
                if m in store:
                    new[:have] = store[m]
                store[m] = new
            if m > 0:
                new = like.new_zeros(size, like.shape[-1])
                if m in self._hidden:
                    new[:have] = self._hidden[m]
                self._hidden[m] = new

    def _block(
        self,
        m: int,
        x: torch.Tensor,
        pos: torch.Tensor,
        req: torch.Tensor,
        table: torch.Tensor,
        slots: torch.Tensor,
        ok: torch.Tensor,
    ) -> torch.Tensor:
        """Head ``m``'s decoder layer over rows ``x [R, H]`` (attention over positions > m)."""
        layer = self.heads[m].layer
        attn = layer.self_attn
        residual = x
        h = layer.input_layernorm(x)
        qkv, _ = attn.qkv_proj(h)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(pos + 1, q, k)  # our positions: t = q + 1
        nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self._keys[m].index_copy_(0, slots[ok], k.view(-1, nkv, hd)[ok])
        self._values[m].index_copy_(0, slots[ok], v.view(-1, nkv, hd)[ok])
        q = q.view(-1, nh, hd)
        o = q.new_zeros(q.shape)
        for r in torch.unique(req).tolist():
            rows = ((req == r) & ok).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            qpos = pos[rows]
            kpos = torch.arange(m, int(qpos.max()) + 1, device=pos.device)
            kslots = self._slots(table, torch.full_like(kpos, r), kpos)
            keys = self._keys[m].index_select(0, kslots).transpose(0, 1)  # [kv, S, hd]
            vals = self._values[m].index_select(0, kslots).transpose(0, 1)
            if nh != nkv:
                keys = keys.repeat_interleave(nh // nkv, dim=0)
                vals = vals.repeat_interleave(nh // nkv, dim=0)
            mask = kpos[None, :] <= qpos[:, None]  # [R, S]
            out = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1), keys, vals, attn_mask=mask, scale=attn.scaling
            )
            o[rows] = out.transpose(0, 1)
        o, _ = attn.o_proj(o.reshape(-1, nh * hd))
        h, residual = layer.post_attention_layernorm(o, residual)
        return layer.mlp(h) + residual

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load ``heads.{i}.*`` and ``norm.weight`` (HF decoder-layer names) into the heads.

        Raises:
            ValueError: On a tensor the drafter does not know.
        """
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        stacked = {
            "q_proj": ("qkv_proj", "q"),
            "k_proj": ("qkv_proj", "k"),
            "v_proj": ("qkv_proj", "v"),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            parts = name.split(".")
            shard: Any = None
            if name == "norm.weight":
                target = name
            elif parts[0] == "heads" and len(parts) > 3 and parts[2] == "block":
                rest = parts[3:]
                if len(rest) == 3 and rest[1] in stacked:
                    rest = [rest[0], stacked[rest[1]][0], rest[2]]
                    shard = stacked[parts[4]][1]
                target = ".".join(["heads", parts[1], "layer", *rest])
            else:
                target = name
            if target not in params:
                raise ValueError(f"the MCTP drafter folder holds {name!r}, which no head has")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"the MCTP drafter folder lacks {missing[:5]}")
        return loaded


def _unwrap(model: Any) -> Any:
    for _ in range(4):
        inner = getattr(model, "unwrap", None)
        if callable(inner):
            model = inner()
            continue
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
            continue
        break
    return model


def install_proposer_hook() -> None:
    """Wrap vLLM's EAGLE/MTP ``propose`` so an :class:`MCTPDrafterForCausalLM` learns where each
    step begins (idempotent)."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    original = SpecDecodeBaseProposer.propose
    if getattr(original, "_mctp_hook", False):
        return

    @functools.wraps(original)
    def propose(self: Any, num_speculative_tokens: Any, *args: Any, **kwargs: Any) -> Any:
        model = _unwrap(getattr(self, "model", None))
        if isinstance(model, MCTPDrafterForCausalLM):
            model.begin_step(int(num_speculative_tokens))
        return original(self, num_speculative_tokens, *args, **kwargs)

    propose._mctp_hook = True  # type: ignore[attr-defined]
    SpecDecodeBaseProposer.propose = propose  # type: ignore[method-assign]
