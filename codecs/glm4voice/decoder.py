"""GLM-4-Voice speech decoder adapter: 12.5 Hz speech ids -> 22,050 Hz waveform.

:class:`GLM4VoiceDecoder` loads the released ``glm-4-voice-decoder`` folder (``config.yaml``,
``flow.pt``, ``hift.pt``) and implements :class:`~mctp.codecs.base.AudioDecoder`:

* ``decode(ids)``: one flow call on all ids (no prompt) + one HiFT call, like
  ``AudioDecoder.offline_inference`` / ``token2wav(..., finalize=True)``.
* ``stream()``: a :class:`GLM4VoiceDecoderStream` that reproduces ``AudioDecoder.token2wav``
  chunk by chunk (prompt = all earlier ids and all earlier returned mels, 34-frame Hamming
  crossfade, 1 mel-frame + 256-sample HiFT caches, hold-back unless final).
* :func:`iter_web_demo_chunks` cuts a full id sequence the way ``web_demo.py`` does
  (25, 50, 100, 150, 200, 200, ... ids).

Randomness: the original reseeds PyTorch's *global* RNG with 42 in every flow call and lets
HiFT continue from it. Here each ``decode``/``push`` call draws from a private CPU
``torch.Generator`` seeded with ``seed`` (42), first the flow noise ``z`` then HiFT's phases and
noise, so the draws equal the original's on CPU, nothing global is touched, and results do
not depend on the device. ``noise=False`` replaces HiFT's draws by zeros.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mctp.checkpoint import load_strict, read_state_dict

from .._loading import check_finite, release_folder
from .config import DecoderConfig, load_decoder_config
from .flow import TokenToMelFlow, build_flow
from .hift import HiFTVocoder, build_hift

__all__ = [
    "WEB_DEMO_BLOCK_SIZES",
    "GLM4VoiceDecoder",
    "GLM4VoiceDecoderStream",
    "iter_web_demo_chunks",
]

WEB_DEMO_BLOCK_SIZES: tuple[int, ...] = (25, 50, 100, 150, 200)
"""Chunk sizes of GLM-4-Voice's ``web_demo.py``; the last one repeats."""


def iter_web_demo_chunks(
    ids: torch.Tensor, block_sizes: Sequence[int] = WEB_DEMO_BLOCK_SIZES
) -> Iterator[tuple[torch.Tensor, bool]]:
    """Cut a full id sequence into the web demo's streaming chunks.

    The demo emits a chunk once ``block_sizes[k]`` ids are buffered and another one arrives,
    then moves to the next size (the last size repeats); the ids left when the sequence ends
    form the final chunk (which may be a full block).

    Args:
        ids: ``[N]`` ids.
        block_sizes: Chunk sizes, each >= 1.

    Yields:
        ``(chunk [n_k], final)``; nothing for ``N == 0``.

    Raises:
        ValueError: If ``ids`` is not 1-D or a block size is < 1 or the list is empty.
    """
    if ids.ndim != 1:
        raise ValueError(f"expected ids of shape [N], got {tuple(ids.shape)}")
    if not block_sizes or any(b < 1 for b in block_sizes):
        raise ValueError(f"block_sizes must be a non-empty list of sizes >= 1, got {block_sizes}")
    start, k, n = 0, 0, ids.numel()
    while start < n:
        size = block_sizes[min(k, len(block_sizes) - 1)]
        end = start + size
        yield ids[start:end], end >= n
        start, k = end, k + 1


class GLM4VoiceDecoder:
    """GLM-4-Voice decoder: flow matching (ids -> mel) + HiFT (mel -> waveform).

    Attributes:
        sample_rate: Output sample rate (22,050).
        frame_rate: Ids per second (``input_frame_rate``, 12.5).
        codebook_size: Number of ids (flow ``vocab_size``).
        hop_length: Output samples per mel frame (256).
        n_timesteps: Euler steps of the flow.
        seed: Seed of the private generator of every decode call.
        noise: Whether HiFT draws its random phases/noise (False = zeros).
        flow: The flow module.
        hift: The vocoder module.
        config: Parsed ``config.yaml`` (None when built from modules).

    Args:
        flow: Flow module with loaded weights.
        hift: Vocoder with loaded weights.
        sample_rate: Output sample rate.
        n_timesteps: Euler steps (10 in GLM-4-Voice).
        seed: Generator seed (42, as the original's ``torch.manual_seed(42)``).
        noise: HiFT random draws on (True) or zeroed (False).
        config: The config the modules were built from, if any.

    Raises:
        ValueError: If ``n_timesteps < 1`` or the two modules disagree on mel bins / hop.
    """

    def __init__(
        self,
        flow: TokenToMelFlow,
        hift: HiFTVocoder,
        *,
        sample_rate: int,
        n_timesteps: int = 10,
        seed: int = 42,
        noise: bool = True,
        config: DecoderConfig | None = None,
    ) -> None:
        if n_timesteps < 1:
            raise ValueError(f"n_timesteps must be >= 1, got {n_timesteps}")
        if flow.hop_length != hift.hop_length:
            raise ValueError(f"flow hop ({flow.hop_length}) != HiFT hop ({hift.hop_length})")
        hift_bins = hift.conv_pre.weight_v.shape[1]
        if flow.output_size != hift_bins:
            raise ValueError(f"flow mel bins ({flow.output_size}) != HiFT input bins ({hift_bins})")
        if hift.m_source.sampling_rate != sample_rate:
            raise ValueError(
                f"sample_rate ({sample_rate}) != HiFT source rate ({hift.m_source.sampling_rate})"
            )
        self.flow = flow.eval().requires_grad_(False)
        self.hift = hift.eval().requires_grad_(False)
        self.sample_rate = sample_rate
        self.frame_rate = float(flow.input_frame_rate)
        self.codebook_size = flow.vocab_size
        self.hop_length = hift.hop_length
        self.n_timesteps = n_timesteps
        self.seed = seed
        self.noise = noise
        self.config = config

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        n_timesteps: int = 10,
        seed: int = 42,
        noise: bool = True,
    ) -> GLM4VoiceDecoder:
        """Load a ``glm-4-voice-decoder`` folder.

        Args:
            path: Folder with ``config.yaml``, ``flow.pt`` and ``hift.pt``.
            device: Device of the modules.
            dtype: Parameter dtype (float32 reproduces the reference).
            n_timesteps: Euler steps.
            seed: Generator seed.
            noise: HiFT random draws on/off.

        Returns:
            The decoder, in eval mode.

        Raises:
            FileNotFoundError: If the folder or one of its files is missing.
            ValueError: If ``config.yaml`` is invalid or unsupported, or a ``.pt`` file
                cannot be read.
            mctp.checkpoint.CheckpointError: If a ``.pt`` file is not a state dict, or has
                missing, unexpected or shape-mismatched keys for the sizes in ``config.yaml``.
        """
        folder = release_folder(path, "GLM-4-Voice decoder", ("config.yaml", "flow.pt", "hift.pt"))
        cfg = load_decoder_config(folder / "config.yaml")
        flow = build_flow(cfg.flow, sample_rate=cfg.sample_rate, hop_length=cfg.hift.hop_length)
        hift = build_hift(cfg.hift)
        for module, name in ((flow, "flow.pt"), (hift, "hift.pt")):
            state = read_state_dict(folder / name)
            what = f"GLM-4-Voice {name} ({type(module).__name__})"
            check_finite(state, what)
            load_strict(module, state, what=what)
        flow.to(device=device, dtype=dtype)
        hift.to(device=device, dtype=dtype)
        return cls(
            flow,
            hift,
            sample_rate=cfg.sample_rate,
            n_timesteps=n_timesteps,
            seed=seed,
            noise=noise,
            config=cfg,
        )

    @property
    def device(self) -> torch.device:
        """Device of the modules."""
        return self.flow.input_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the modules."""
        return self.flow.input_embedding.weight.dtype

    def num_frames(self, n_tokens: int) -> int:
        """Mel frames of one flow call on ``n_tokens`` ids (prompt + new)."""
        return self.flow.num_frames(n_tokens)

    def num_samples(self, n_tokens: int) -> int:
        """Samples ``decode`` returns for ``n_tokens`` ids (``num_frames * hop_length``)."""
        return self.num_frames(n_tokens) * self.hop_length

    def check_ids(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Validate ids and move them to the decoder's device.

        Args:
            ids: ``[N]`` integer ids.

        Returns:
            ``[N]`` long tensor.

        Raises:
            ValueError: If ``ids`` is not 1-D, not integer, or outside ``[0, codebook_size)``.
        """
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids) if len(ids) else torch.zeros(0, dtype=torch.long)
        if ids.ndim != 1:
            raise ValueError(f"expected ids of shape [N], got {tuple(ids.shape)}")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(
                f"ids must lie in [0, {self.codebook_size}), got range [{int(ids.min())}, {int(ids.max())}]"
            )
        return ids.to(device=self.device, dtype=torch.long)

    def new_generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with :attr:`seed` (one per decode call / chunk)."""
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def _flow(
        self,
        ids: torch.Tensor,
        prompt_mel: torch.Tensor | None,
        generator: torch.Generator,
        n_timesteps: int | None = None,
    ) -> torch.Tensor:
        frames = self.num_frames(ids.shape[-1])
        shape = (1, self.flow.output_size, frames)
        z = torch.randn(shape, generator=generator, device=generator.device)  # [1, M, T]
        z = z.to(device=self.device, dtype=self.dtype)
        return self.flow(
            ids[None], z, prompt_mel=prompt_mel, n_timesteps=n_timesteps or self.n_timesteps
        )

    @torch.inference_mode()
    def decode_mel(
        self,
        ids: torch.Tensor | Sequence[int],
        *,
        prompt_ids: torch.Tensor | Sequence[int] | None = None,
        prompt_mel: torch.Tensor | None = None,
        n_timesteps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run the flow model only.

        Args:
            ids: ``[N]`` new ids.
            prompt_ids: ``[N_p]`` ids before them (context), or None.
            prompt_mel: ``[M, P]`` mel of the prompt (its frames condition the flow), or None.
            n_timesteps: Euler steps (default :attr:`n_timesteps`).
            generator: Generator for the noise ``z`` (default: a fresh one seeded with
                :attr:`seed`).

        Returns:
            ``[M, num_frames(N_p + N) - P]`` mel (``[M, 0]`` when the ids make no frame and
            there is no prompt).

        Raises:
            ValueError: On invalid ids, a prompt mel with the wrong bins or as long as the
                output, or ``n_timesteps < 1``.
        """
        new = self.check_ids(ids)
        prompt = self.check_ids([] if prompt_ids is None else prompt_ids)
        full = torch.cat([prompt, new])
        pm = None
        if prompt_mel is not None:
            if prompt_mel.ndim != 2 or prompt_mel.shape[0] != self.flow.output_size:
                raise ValueError(
                    f"prompt_mel must have shape [{self.flow.output_size}, P], got {tuple(prompt_mel.shape)}"
                )
            pm = (
                prompt_mel[None].to(device=self.device, dtype=self.dtype)
                if prompt_mel.shape[1]
                else None
            )
        if self.num_frames(full.numel()) == 0 and pm is None:
            return torch.zeros(self.flow.output_size, 0, device=self.device, dtype=self.dtype)
        return self._flow(full, pm, generator or self.new_generator(), n_timesteps)[0]

    @torch.inference_mode()
    def vocode(
        self,
        mel: torch.Tensor,
        *,
        cache_source: torch.Tensor | None = None,
        noise: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run HiFT only.

        Args:
            mel: ``[M, T]`` mel.
            cache_source: ``[C]`` source samples overwriting the start of the new source.
            noise: Random draws (default :attr:`noise`).
            generator: Generator for the draws; None = PyTorch's global generator (as the
                original, e.g. after ``torch.manual_seed(0)``).

        Returns:
            ``(wav [T * hop_length] float32, source [T * hop_length] float32)``.

        Raises:
            ValueError: If ``mel`` is not ``[M, T]`` with ``T >= 1`` or holds NaN or infinite
                values (HiFT would return NaN audio).
        """
        if mel.ndim != 2 or mel.shape[0] != self.flow.output_size or mel.shape[1] < 1:
            raise ValueError(
                f"mel must have shape [{self.flow.output_size}, T>=1], got {tuple(mel.shape)}"
            )
        if not bool(torch.isfinite(mel).all()):
            raise ValueError(
                f"mel holds {int(torch.isnan(mel).sum())} NaN and {int(torch.isinf(mel).sum())} "
                "infinite values; HiFT would turn them into NaN audio"
            )
        cache = None if cache_source is None else cache_source.reshape(1, 1, -1).to(self.device)
        wav, src = self.hift(
            mel[None].to(device=self.device, dtype=self.dtype),
            cache_source=cache,
            noise=self.noise if noise is None else noise,
            generator=generator,
        )
        return wav[0].float(), src[0, 0]

    @torch.inference_mode()
    def decode(
        self, ids: torch.Tensor | Sequence[int], *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Decode one utterance offline (one flow call + one HiFT call).

        Args:
            ids: ``[N]`` ids.
            generator: Generator for all draws (default: a fresh one seeded with :attr:`seed`).

        Returns:
            ``[num_samples(N)]`` float32 waveform on the decoder's device (empty for ``N == 0``).

        Raises:
            ValueError: On ids that are not 1-D integers in ``[0, codebook_size)``.
        """
        ids = self.check_ids(ids)
        if self.num_frames(ids.numel()) == 0:
            return torch.zeros(0, device=self.device)
        gen = generator or self.new_generator()
        mel = self._flow(ids, None, gen)
        wav, _ = self.hift(mel, noise=self.noise, generator=gen)
        return wav[0].float()

    def stream(self) -> GLM4VoiceDecoderStream:
        """Open a streaming session (see :class:`GLM4VoiceDecoderStream`)."""
        return GLM4VoiceDecoderStream(self)


class GLM4VoiceDecoderStream:
    """Streaming session that reproduces GLM-4-Voice's ``AudioDecoder.token2wav`` per chunk.

    Per non-empty ``push`` the flow runs on (all earlier ids + new ids) with the
    concatenation of all earlier returned mels as prompt condition and keeps the frames after
    it; if an earlier chunk held back an overlap, the first ``overlap_frames`` new frames are
    crossfaded with it (Hamming window); the previous chunk's last mel frame is prepended;
    unless ``final``, the last ``overlap_frames`` frames are held back, HiFT runs with the
    previous source tail overwriting the start of its source, and the last ``hop_length``
    samples are dropped (they are re-synthesised from the cached frame next time).

    Like the original, the prompt of the next chunk is the concatenation of the returned
    mels *including* each chunk's re-synthesised cache frame, so from the third chunk on the
    prompt is one frame longer than the audio it stands for and every further chunk starts
    (and crossfades) one frame late: a stream of ``k >= 2`` chunks yields
    ``num_samples(N) - (k - 2) * hop_length`` samples. The golden data (2 chunks) and the web
    demo's first two blocks are unaffected.

    Empty and short chunks: an empty non-final push returns no samples and changes nothing.
    A first non-final chunk too short to produce a frame beyond the overlap (fewer than 6 ids
    at 12.5 Hz, where the original would fail) is buffered and decoded with the next push.
    An empty final push flushes: the held-back overlap frames are vocoded (after the cached
    frame, with the source cache) without a partner to fade with. After a final push the
    session is finished until :meth:`reset`.

    Attributes:
        overlap_frames: Crossfade length in mel frames (34 = ``int(5 / 12.5 * 22050 / 256)``).
        chunk_times: Seconds spent in each push that ran the models.
        mels: ``[M, t_k]`` mel returned by each model-running push (what ``token2wav``
            returns as ``tts_mel``; their concatenation is the next prompt).

    Args:
        decoder: The decoder.
        overlap_tokens: Overlap in ids (5 in GLM-4-Voice).
        mel_cache_frames: Mel frames re-synthesised at each chunk start (1).
    """

    def __init__(
        self, decoder: GLM4VoiceDecoder, *, overlap_tokens: int = 5, mel_cache_frames: int = 1
    ) -> None:
        self.decoder = decoder
        self.overlap_frames = int(
            overlap_tokens / decoder.frame_rate * decoder.sample_rate / decoder.hop_length
        )
        if self.overlap_frames < 1 or mel_cache_frames < 1:
            raise ValueError(
                f"overlap ({self.overlap_frames} frames) and mel cache ({mel_cache_frames}) must be >= 1"
            )
        self.mel_cache_frames = mel_cache_frames
        self.source_cache_len = mel_cache_frames * decoder.hop_length
        # float64 window, as the original (numpy.hamming), applied in float64
        self._window = torch.from_numpy(np.hamming(2 * self.overlap_frames))
        self.reset()

    def reset(self) -> None:
        """Forget all state so that the session can decode a new utterance."""
        dev = self.decoder.device
        self._prompt_ids = torch.zeros(0, dtype=torch.long, device=dev)
        self._pending = torch.zeros(0, dtype=torch.long, device=dev)
        self._overlap: torch.Tensor | None = None  # [1, M, overlap_frames]
        self._cache_mel: torch.Tensor | None = None  # [1, M, mel_cache_frames]
        self._cache_source: torch.Tensor | None = None  # [1, 1, source_cache_len]
        self._finished = False
        self.mels: list[torch.Tensor] = []
        self.chunk_times: list[float] = []

    @property
    def finished(self) -> bool:
        """True after a final push (until :meth:`reset`)."""
        return self._finished

    @property
    def pending(self) -> int:
        """Number of buffered ids not decoded yet."""
        return int(self._pending.numel())

    def _record_time(self, start: float) -> None:
        if self.decoder.device.type == "cuda":
            torch.cuda.synchronize(self.decoder.device)
        self.chunk_times.append(time.perf_counter() - start)

    def _crossfade(self, mel: torch.Tensor) -> torch.Tensor:
        assert self._overlap is not None
        n = self.overlap_frames
        w = self._window.to(mel.device)
        head = mel[:, :, :n].double() * w[:n] + self._overlap.double() * w[n:]
        return torch.cat([head.to(mel.dtype), mel[:, :, n:]], dim=2)

    def _vocode(
        self, mel: torch.Tensor, generator: torch.Generator, final: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the cached frame, hold back the overlap unless final, run HiFT with caches.

        Returns ``(mel handed to HiFT [1, M, t], wav [1, S])``.
        """
        if self._cache_mel is not None:
            mel = torch.cat([self._cache_mel, mel], dim=2)
        if not final:
            self._overlap = mel[:, :, -self.overlap_frames :]
            mel = mel[:, :, : -self.overlap_frames]
        wav, src = self.decoder.hift(
            mel, cache_source=self._cache_source, noise=self.decoder.noise, generator=generator
        )
        if final:
            self._finished = True
        else:
            self._cache_mel = mel[:, :, -self.mel_cache_frames :]
            self._cache_source = src[:, :, -self.source_cache_len :]
            wav = wav[:, : -self.source_cache_len]
        return mel, wav

    @torch.inference_mode()
    def push(self, ids: torch.Tensor | Sequence[int], *, final: bool = False) -> torch.Tensor:
        """Feed the next chunk of ids and get the audio that is ready.

        Args:
            ids: ``[N]`` new ids (not the ones pushed before).
            final: Last chunk: everything held back is flushed and the session finishes.

        Returns:
            ``[S]`` float32 samples on the decoder's device (may be empty).

        Raises:
            RuntimeError: If the session already finished (call :meth:`reset`).
            ValueError: On invalid ids, or a final chunk too short to crossfade (only possible
                when one id spans less than one mel frame).
        """
        if self._finished:
            raise RuntimeError(
                "this stream already received final=True; call reset() to start a new one"
            )
        ids = torch.cat([self._pending, self.decoder.check_ids(ids)])
        self._pending = ids[:0]
        empty = torch.zeros(0, device=self.decoder.device)
        start = time.perf_counter()
        if ids.numel() == 0:
            if not final:
                return empty
            self._finished = True
            if self._overlap is None:
                return empty
            mel, wav = self._vocode(self._overlap, self.decoder.new_generator(), final=True)
            self.mels.append(mel[0])
            self._record_time(start)
            return wav[0].float()

        prompt_frames = sum(m.shape[-1] for m in self.mels)
        new_frames = self.decoder.num_frames(self._prompt_ids.numel() + ids.numel()) - prompt_frames
        if self._overlap is not None:
            need = self.overlap_frames
        else:
            need = 1 if final else self.overlap_frames + 1
        if new_frames < need:
            if not final:
                self._pending = ids
                return empty
            if self._overlap is not None:
                raise ValueError(
                    f"final chunk of {ids.numel()} ids gives {new_frames} new frames, fewer than the "
                    f"{self.overlap_frames}-frame crossfade needs"
                )
            self._finished = True
            return empty

        generator = self.decoder.new_generator()
        prompt_mel = torch.cat(self.mels, dim=1)[None] if self.mels else None
        mel = self.decoder._flow(torch.cat([self._prompt_ids, ids]), prompt_mel, generator)
        if self._overlap is not None:
            mel = self._crossfade(mel)
        mel, wav = self._vocode(mel, generator, final)
        self._prompt_ids = torch.cat([self._prompt_ids, ids])
        self.mels.append(mel[0])
        self._record_time(start)
        return wav[0].float()
