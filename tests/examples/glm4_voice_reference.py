"""An independent float64 reference of the released ChatGLM (GLM-4-Voice-9B) forward.

Written from the facts of the released ``modeling_chatglm.py`` (not from transformers' GLM
port, and not sharing code with ``examples/glm4_voice``): it reads the released key names
straight from the folder's state dict.

* RMSNorm: ``x * rsqrt(mean(x^2) + eps) * w``;
* fused QKV with bias, split ``[heads * D, groups * D, groups * D]``; query head ``h`` reads
  key/value group ``h // (heads / groups)``;
* rotary on the first ``D / 2`` dims of every head, adjacent pairs ``(x0, x1)`` rotated to
  ``(x0 cos - x1 sin, x1 cos + x0 sin)``, ``theta_j = (10000 rope_ratio)^(-2j / (D/2))``;
* causal softmax attention scaled by ``1 / sqrt(D)``; output ``dense`` without bias;
* SwiGLU: ``dense_h_to_4h`` gives ``[a, b]``, ``silu(a) * b``, then ``dense_4h_to_h``;
* final RMSNorm, untied ``output_layer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


class ReleasedChatGLM:
    """The released forward over a folder's tensors, in float64.

    Args:
        folder: A folder with ``config.json`` and ``model.safetensors`` (released names).
    """

    def __init__(self, folder: str | Path) -> None:
        self.cfg = json.loads((Path(folder) / "config.json").read_text())
        self.w = {
            k: v.double() for k, v in load_file(str(Path(folder) / "model.safetensors")).items()
        }

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        eps = self.cfg["layernorm_epsilon"]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``t`` ``[n, T, D]`` -> rotated on its first ``D / 2`` dims."""
        d = t.shape[-1]
        rot = d // 2
        base = 10000.0 * self.cfg.get("rope_ratio", 1)
        theta = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        ang = pos.double()[:, None] * theta[None, :]  # [T, rot/2]
        cos, sin = ang.cos(), ang.sin()
        pairs = t[..., :rot].reshape(*t.shape[:-1], rot // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
        return torch.cat([out, t[..., rot:]], dim=-1)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits ``[T, V]`` of one sequence."""
        c, w = self.cfg, self.w
        heads, groups, d = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"]
        ids_t = torch.tensor(ids)
        n = len(ids)
        pos = torch.arange(n)
        x = w["transformer.embedding.word_embeddings.weight"][ids_t]
        causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
        for i in range(c["num_layers"]):
            p = f"transformer.encoder.layers.{i}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            qkv = h @ w[p + "self_attention.query_key_value.weight"].T
            qkv = qkv + w[p + "self_attention.query_key_value.bias"]
            q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
            q = self._rope(q.view(n, heads, d).transpose(0, 1), pos)
            k = self._rope(k.view(n, groups, d).transpose(0, 1), pos)
            v = v.view(n, groups, d).transpose(0, 1)
            group_of = torch.arange(heads) // (heads // groups)
            k, v = k[group_of], v[group_of]
            scores = q @ k.transpose(-1, -2) / d**0.5 + causal
            att = torch.softmax(scores, dim=-1) @ v  # [heads, T, D]
            x = (
                x
                + att.transpose(0, 1).reshape(n, heads * d) @ w[p + "self_attention.dense.weight"].T
            )
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            a, b = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(a) * b) @ w[p + "mlp.dense_4h_to_h.weight"].T
        x = self._rms(x, w["transformer.encoder.final_layernorm.weight"])
        return x @ w["transformer.output_layer.weight"].T

    def greedy(self, prompt: list[int], max_new_tokens: int, stop: list[int]) -> list[int]:
        """The released greedy loop: argmax of the last position, until a stop id (kept)."""
        seq = list(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(seq)[-1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt in stop:
                break
        return out
