"""The module transformers' ``Trainer`` trains: backbone + MCTP heads (+ Plus audio encoder).

``forward`` returns summed cross-entropies (main and per head) and their token counts, and a
``loss`` normalised by ``num_items_in_batch`` (the labelled tokens of the whole accumulated,
all-rank batch, as the official VITA-Audio trainer does) or, without it, by this micro-batch's
labelled tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mctp.losses import chunked_cross_entropy
from mctp.stack import MCTPStack, shift_targets

if TYPE_CHECKING:
    from mctp.backbones import HFBackbone

__all__ = ["MCTPTrainingModel"]


class MCTPTrainingModel(nn.Module):
    """Backbone, MCTP heads and (VITA-Audio-Plus) audio encoder + projector, for training.

    Args:
        backbone: An :class:`~mctp.backbones.HFBackbone` (any architecture it accepts).
        stack: Its MCTP heads, or None (stage 1).
        mtp_loss_weight: Weight of the MCTP term (``total = main + w * mean_k CE_k``).
        train_backbone: The LLM trains (main loss counted); False: frozen, main loss dropped,
            its outputs detached (run without autograd).
        detach_mtp_inputs: Detach the heads' inputs even when the backbone trains.
        audio_model: Plus: the SenseVoice query table + encoder
            (``(feats [A, F, D_in], lengths [A], queries [4]) -> ([A, F + 4, D], lengths)``).
        audio_projection: Plus: encoder frames ``[.., D]`` -> embeddings ``[.., H]``.
        audio_placeholder_id: Plus: the ``<|context_of_audio|>`` id whose embeddings the
            projected frames replace (in the backbone only; heads embed the ids).
        audio_queries: Plus: the 4 query rows (language, event, emotion, text norm).
        loss_chunk_size: Rows per cross-entropy block.

    Raises:
        ValueError: If the Plus parts are given partly, or the stack is not on this backbone.
    """

    def __init__(
        self,
        *,
        backbone: HFBackbone,
        stack: MCTPStack | None = None,
        mtp_loss_weight: float = 1.0,
        train_backbone: bool = True,
        detach_mtp_inputs: bool = False,
        audio_model: nn.Module | None = None,
        audio_projection: nn.Module | None = None,
        audio_placeholder_id: int | None = None,
        audio_queries: Sequence[int] | None = None,
        loss_chunk_size: int = 2048,
    ) -> None:
        super().__init__()
        plus = (audio_model, audio_projection, audio_placeholder_id, audio_queries)
        if any(p is not None for p in plus) and any(p is None for p in plus):
            raise ValueError(
                "the Plus path needs audio_model, audio_projection, audio_placeholder_id and "
                "audio_queries together"
            )
        if stack is not None and stack.embed is not backbone.parts().embed:
            raise ValueError("the MCTP stack does not share this backbone's embedding")
        self.backbone = backbone
        self.config = backbone.config  # engines read sizes from it (DeepSpeed "auto" buckets)
        self.stack = stack
        self.audio_model = audio_model
        self.audio_projection = audio_projection
        self.audio_placeholder_id = audio_placeholder_id
        if audio_queries is not None:
            self.register_buffer(
                "audio_queries",
                torch.tensor(list(audio_queries), dtype=torch.long),
                persistent=False,
            )
        else:
            self.audio_queries = None
        self.mtp_loss_weight = float(mtp_loss_weight)
        self.train_backbone = train_backbone
        self.detach_mtp_inputs = detach_mtp_inputs
        self.loss_chunk_size = loss_chunk_size

    # ------------------------------------------------------------------ structure
    @property
    def is_plus(self) -> bool:
        """Whether the model has the SenseVoice audio input path."""
        return self.audio_model is not None

    @property
    def num_heads(self) -> int:
        """Number of MCTP heads (0 without a stack)."""
        return 0 if self.stack is None else self.stack.num_heads

    def set_num_heads(self, n: int) -> None:
        """Create (from the backbone's last layer) or grow (copies of the last head) to ``n``.

        Raises:
            ValueError: If the model has more than ``n`` heads, or ``n = 0`` with heads.
        """
        have = self.num_heads
        if have > n:
            raise ValueError(f"the model has {have} MCTP heads, the stage wants {n}")
        if n == have:
            return
        if self.stack is None:
            self.stack = MCTPStack.from_backbone(self.backbone.parts(), n)
        else:
            self.stack.grow(n - have)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Re-compute the backbone's layers in the backward pass (called by ``Trainer``)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        own = getattr(self.backbone, "gradient_checkpointing_enable", None)
        hf = getattr(self.backbone.model, "activation_checkpointing_enable", None)
        if own is not None:
            own(gradient_checkpointing_kwargs=kwargs)
        elif hf is not None:  # transformers >= 5.x name
            hf(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------ forward
    def _embed(
        self,
        input_ids: torch.Tensor,
        audio_features: torch.Tensor | None,
        audio_feature_lengths: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Backbone input embeddings with the projected audio frames (Plus), else None."""
        if audio_features is None:
            if self.is_plus and bool((input_ids == self.audio_placeholder_id).any()):
                raise ValueError("the batch holds audio placeholders but no audio_features")
            return None
        if not self.is_plus:
            raise ValueError("audio_features given but the model has no audio encoder")
        from mctp.codecs import scatter_audio_embeddings

        assert audio_feature_lengths is not None and self.audio_queries is not None
        out, lengths = self.audio_model(audio_features, audio_feature_lengths, self.audio_queries)
        frames = self.audio_projection(out)  # [A, F + 4, H]
        embeds = self.backbone.base.embed_tokens(input_ids)
        pieces = [frames[i, :n] for i, n in enumerate(lengths.tolist())]
        return scatter_audio_embeddings(embeds, input_ids, pieces, self.audio_placeholder_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_logits: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Training forward over a packed batch.

        Args:
            input_ids: ``[B, T]``.
            labels: ``[B, T]`` causal-LM labels aligned with the inputs (-100 ignored).
            position_ids: ``[B, T]`` restarting at 0 per packed sample.
            attention_mask: ``[B, T]`` padding mask, optional.
            shift_labels: ``[B, T]`` next-token targets (from the collator); computed from
                ``labels`` when absent.
            audio_features: Plus: ``[A, F, D_in]`` encoder inputs of the batch's audios, in
                placeholder order; ``audio_feature_lengths`` ``[A]`` their lengths.
            num_items_in_batch: Labelled tokens of the accumulated batch over all ranks.
            return_logits: Also return the backbone logits ``[B, T, V]`` and the heads'
                ``[N, B, T, V]`` (evaluation; memory heavy).
            **kwargs: Ignored (transformers passes extra loss kwargs).

        Returns:
            ``loss`` (scalar), ``main_sum``/``main_count`` (scalar float/long),
            ``head_sums`` ``[N]`` / ``head_counts`` ``[N]``, and with ``return_logits``
            ``logits``, ``head_logits``, ``head_targets`` ``[N, B, T]``.

        Raises:
            ValueError: Without labels, or on inconsistent audio inputs.
        """
        if labels is None:
            raise ValueError("MCTPTrainingModel.forward needs labels")
        if position_ids is None:
            from mctp.engine.masks import default_position_ids

            position_ids = default_position_ids(input_ids, attention_mask)
        if shift_labels is None:
            shift_labels = shift_targets(labels, position_ids, attention_mask)
        with contextlib.nullcontext() if self.train_backbone else torch.no_grad():
            embeds = self._embed(input_ids, audio_features, audio_feature_lengths)
            out = self.backbone(
                input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                inputs_embeds=embeds,
            )
        hidden = out.hidden
        main_sum, main_count = chunked_cross_entropy(
            hidden if self.train_backbone else hidden.detach(),
            shift_labels,
            self.backbone.lm_head,
            chunk_size=self.loss_chunk_size,
        )
        device = hidden.device
        head_sums = torch.zeros(0, device=device)
        head_counts = torch.zeros(0, dtype=torch.long, device=device)
        mctp = None
        if self.stack is not None:
            mctp = self.stack(
                hidden,
                input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                labels=labels,
                return_logits=return_logits,
                detach_backbone=self.detach_mtp_inputs or not self.train_backbone,
                loss_chunk_size=self.loss_chunk_size,
            )
            head_sums, head_counts = mctp.loss_sums, mctp.num_targets
        divisor = main_count if num_items_in_batch is None else num_items_in_batch
        divisor = torch.as_tensor(divisor, device=device).clamp_min(1).to(main_sum.dtype)
        loss = main_sum.new_zeros(())
        if self.train_backbone:
            loss = loss + main_sum / divisor
        if head_sums.numel():
            loss = loss + self.mtp_loss_weight * (head_sums / divisor).mean()
        if not self.train_backbone and not head_sums.numel():
            raise ValueError("a frozen backbone without MCTP heads leaves nothing to train")
        result: dict[str, Any] = {
            "loss": loss,
            "main_sum": main_sum.detach(),
            "main_count": main_count,
            "head_sums": head_sums.detach(),
            "head_counts": head_counts,
        }
        if return_logits:
            result["logits"] = self.backbone.lm_head(hidden)
            result["head_logits"] = None if mctp is None else torch.stack(mctp.logits)
            result["head_targets"] = None if mctp is None else mctp.targets
        return result
