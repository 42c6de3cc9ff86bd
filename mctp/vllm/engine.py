"""``VLLMEngine``: vLLM's async engine behind a token-id streaming interface.

Meant for ``mctp serve --engine vllm``: the server hands prompt ids in and gets the newly
generated ids back as vLLM produces them (continuous batching across concurrent requests,
verified drafts from the MCTP drafter when one is given).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["VLLMEngine"]


class VLLMEngine:
    """An ``AsyncLLM`` over a model folder, optionally with an exported MCTP drafter.

    Args:
        model: A transformers Qwen2/Llama folder or an official VITA-Audio folder.
        drafter: An ``mctp export vllm`` folder (None: no speculative decoding).
        num_speculative_tokens: Drafts per step (default: all the drafter's heads).
        dtype: Weights/activations dtype (``"auto"``, ``"float32"``, ``"bfloat16"``...).
        max_num_seqs: Most requests batched in one step.
        max_model_len: Longest prompt + generation (default: the model's).
        engine_kwargs: Further ``AsyncEngineArgs`` fields (``tensor_parallel_size``,
            ``gpu_memory_utilization``, ``enforce_eager``...).

    Attributes:
        model: The model folder.
        dtype: The dtype asked for.
        max_num_seqs: Most requests batched in one step.
        max_model_len: Longest prompt + generation (the model's when not given).
        drafter: The drafter folder (None without speculative decoding).
        num_speculative_tokens: Drafts per step (0 without a drafter).
        steps: Engine steps whose scheduler statistics reached us.
        batched_steps: Steps that ran more than one request together.
        max_running: Most requests vLLM's scheduler ran in one step (continuous batching seen
            from vLLM's side, not from ours).

    Raises:
        RuntimeError: If the installed vLLM is not the pinned release.
        FileNotFoundError: If ``drafter`` has no ``config.json``.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        drafter: str | Path | None = None,
        num_speculative_tokens: int | None = None,
        dtype: str = "auto",
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from . import check_vllm_version

        check_vllm_version()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args: dict[str, Any] = {
            "model": str(model),
            "dtype": dtype,
            "max_num_seqs": max_num_seqs,
            "skip_tokenizer_init": True,  # ids in, ids out: the server owns the tokenizer
            "enforce_eager": True,  # the drafter's cascade keeps Python state per step
        }
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if drafter is not None:
            import json

            config_file = Path(drafter) / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"no config.json in the drafter folder {drafter}")
            heads = int(json.loads(config_file.read_text())["num_nextn_predict_layers"])
            args["speculative_config"] = {
                "method": "mtp",
                "model": str(drafter),
                "num_speculative_tokens": num_speculative_tokens or heads,
            }
        args.update(engine_kwargs or {})
        self.model, self.dtype, self.max_num_seqs = str(model), dtype, max_num_seqs
        self.drafter = None if drafter is None else Path(drafter)
        self.num_speculative_tokens = (
            int(args["speculative_config"]["num_speculative_tokens"]) if drafter else 0
        )
        self.steps = 0
        self.batched_steps = 0
        self.max_running = 0
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**args), stat_loggers=[self._stat_logger]
        )
        self.max_model_len = int(self.engine.model_config.max_model_len)

    def _stat_logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """A vLLM stat logger (factory signature) that counts the scheduler's batch sizes."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        owner = self

        class _Batches(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is None:
                    return
                running = int(scheduler_stats.num_running_reqs)
                owner.steps += 1
                owner.batched_steps += running > 1
                owner.max_running = max(owner.max_running, running)

            def log_engine_initialized(self) -> None:
                pass

        return _Batches(vllm_config, engine_index)

    async def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> AsyncIterator[list[int]]:
        """Generate for one prompt, yielding the new token ids of every engine output.

        Greedy when ``temperature == 0``. Generation stops after ``max_new_tokens`` or right
        after any id of ``eos_token_ids`` (which is yielded). Leaving the iteration early aborts
        the request in vLLM.

        Args:
            prompt_ids: The prompt's token ids.
            max_new_tokens: Most tokens to generate (>= 1).
            eos_token_ids: Ids that end the generation.
            temperature: Sampling temperature (0 = greedy).
            top_p: Nucleus sampling mass.
            top_k: Top-k sampling (0 = off).
            seed: Per-request sampling seed.

        Yields:
            Lists of newly generated ids (several per step when drafts were accepted).

        Raises:
            ValueError: On an empty prompt or ``max_new_tokens < 1``.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_tokens=max_new_tokens,
            stop_token_ids=list(eos_token_ids),
            ignore_eos=True,  # only the caller's eos ids stop
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = uuid.uuid4().hex
        finished = False
        try:
            async for out in self.engine.generate(
                {"prompt_token_ids": list(prompt_ids)}, params, request_id
            ):
                new = list(out.outputs[0].token_ids)
                if new:
                    yield new
                finished = out.finished
        finally:
            if not finished:
                await self.engine.abort(request_id)

    def shutdown(self) -> None:
        """Stop the engine and free its memory."""
        self.engine.shutdown()
