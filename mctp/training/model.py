"""The module transformers' ``Trainer`` trains: backbone + MCTP heads (+ Plus audio encoder).

``forward`` returns the stage loss of :func:`mctp.total_loss` / :func:`mctp.mctp_loss` (summed
cross-entropies over ``num_items_in_batch``: the labelled tokens of the whole accumulated,
all-rank batch, as the official VITA-Audio trainer; without it this micro-batch's count) and
the summed cross-entropies and token counts behind it. What trains and the MCTP loss weight
come from the applied :class:`~mctp.training.StagePreset` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mctp.losses import MCTPLoss, mctp_loss, total_loss
from mctp.stack import MCTPStack

if TYPE_CHECKING:
    from mctp.backbones import HFBackbone

    from .stages import StagePreset

__all__ = ["MCTPTrainingModel"]


class MCTPTrainingModel(nn.Module):
    """Backbone, MCTP heads and (VITA-Audio-Plus) audio encoder + projector, for training.

    Args:
        backbone: An :class:`~mctp.backbones.HFBackbone` (any architecture it accepts).
        stack: Its MCTP heads, or None (stage 1).
        audio_model: Plus: the SenseVoice query table + encoder
            (``(feats [A, F, D_in], lengths [A], queries [4]) -> ([A, F + 4, D], lengths)``).
        audio_projection: Plus: encoder frames ``[.., D]`` -> embeddings ``[.., H]``.
        audio_placeholder_id: Plus: the ``<|context_of_audio|>`` id whose embeddings the
            projected frames replace (in the backbone only; heads embed the ids).
        audio_queries: Plus: the 4 query rows (language, event, emotion, text norm).
        loss_chunk_size: Rows per cross-entropy block.

    What trains (``train_backbone``, ``detach_mtp_inputs``) and the loss weight
    (``mtp_loss_weight``) are read-only: :meth:`StagePreset.apply` sets them (their one owner);
    :meth:`forward` refuses to run before a stage was applied.

    Raises:
        ValueError: If the Plus parts are given partly, or the stack is not on this backbone.
    """

    def __init__(
        self,
        *,
        backbone: HFBackbone,
        stack: MCTPStack | None = None,
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
        self.loss_chunk_size = loss_chunk_size
        self._stage: StagePreset | None = None
        self._mtp_loss_weight: float | None = None

    # ------------------------------------------------------------------ stage settings
    @property
    def stage(self) -> StagePreset | None:
        """The applied stage (None before :meth:`StagePreset.apply`)."""
        return self._stage

    def _set_stage(self, stage: StagePreset) -> None:
        """Record the applied stage; only :meth:`StagePreset.apply` calls this."""
        self._stage = stage
        w = stage.mtp_loss_weight
        self._mtp_loss_weight = None if w is None else float(w)

    def _applied(self) -> StagePreset:
        if self._stage is None:
            raise RuntimeError(
                "no training stage applied: call StagePreset.apply(model) (e.g. "
                "vita_audio_stage(2).apply(model)); it sets what trains and the loss weight"
            )
        return self._stage

    @property
    def train_backbone(self) -> bool:
        """The LLM trains and the main loss counts (from the applied stage).

        Raises:
            RuntimeError: Before a stage was applied.
        """
        return self._applied().train_backbone

    @property
    def detach_mtp_inputs(self) -> bool:
        """The heads' inputs are detached (the stage's setting, always for Plus).

        Raises:
            RuntimeError: Before a stage was applied.
        """
        return self._applied().detach_mtp_inputs or self.is_plus

    @property
    def mtp_loss_weight(self) -> float:
        """Weight of the MCTP term (``total = main + w * mean_k``), from the applied stage.

        Raises:
            RuntimeError: Before a stage was applied, or when it set no weight (a stage
                without heads may leave it None).
        """
        stage = self._applied()
        if self._mtp_loss_weight is None:
            raise RuntimeError(f"stage {stage.name!r} sets no mtp_loss_weight")
        return self._mtp_loss_weight

    # ------------------------------------------------------------------ checkpoints
    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """State-dict names that alias another name's memory (tied embeddings, modules the
        backbone registers twice): checkpoints keep the first name of each, so after a resume
        these are the missing keys, which transformers' ``Trainer`` accepts when they equal
        this list (it then calls :meth:`tie_weights`)."""
        seen: set[tuple[int, int]] = set()
        aliases = []
        for name, t in self.state_dict().items():
            key = (id(t), 0) if t.device.type == "meta" else (t.data_ptr(), t.storage_offset())
            if key in seen:
                aliases.append(name)
            seen.add(key)
        return aliases

    def tie_weights(self) -> None:
        """Nothing to do: aliased names share their memory, loading one fills all."""

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
            shift_labels: ``[B, T]`` next-token targets (the collator's, for transformers'
                ``num_items_in_batch`` count); the loss derives the same targets from
                ``labels``, so they are not read here.
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
            RuntimeError: Before a stage was applied.
        """
        if labels is None:
            raise ValueError("MCTPTrainingModel.forward needs labels")
        train_backbone = self.train_backbone
        if position_ids is None:
            from mctp.engine.masks import default_position_ids

            position_ids = default_position_ids(input_ids, attention_mask)
        with contextlib.nullcontext() if train_backbone else torch.no_grad():
            embeds = self._embed(input_ids, audio_features, audio_feature_lengths)
            out = self.backbone(
                input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                inputs_embeds=embeds,
                labels=labels,
                return_logits=return_logits,
                loss_chunk_size=self.loss_chunk_size,
            )
        assert out.loss is not None and out.num_targets is not None
        hidden = out.hidden
        mctp: MCTPLoss | None = None
        if self.stack is not None:
            mctp = mctp_loss(
                self.stack,
                hidden,
                input_ids,
                labels,
                position_ids=position_ids,
                attention_mask=attention_mask,
                weight=self.mtp_loss_weight,  # set whenever the stage has heads
                num_items_in_batch=num_items_in_batch,
                detach_backbone=self.detach_mtp_inputs or not train_backbone,
                chunk_size=self.loss_chunk_size,
                return_logits=return_logits,
            )
        loss = total_loss(
            out.loss,
            mctp,
            backbone_frozen=not train_backbone,
            main_count=out.num_targets,
            num_items_in_batch=num_items_in_batch,
        )
        device = hidden.device
        count = out.num_targets
        result: dict[str, Any] = {
            "loss": loss,
            "main_sum": (out.loss.detach().float() * count.clamp_min(1)),
            "main_count": count,
            "head_sums": torch.zeros(0, device=device) if mctp is None else mctp.loss_sums,
            "head_counts": (
                torch.zeros(0, dtype=torch.long, device=device)
                if mctp is None
                else mctp.num_targets
            ),
        }
        if return_logits:
            result["logits"] = out.logits
            result["head_logits"] = None if mctp is None else torch.stack(mctp.output.logits)
            result["head_targets"] = None if mctp is None else mctp.output.targets
        return result
