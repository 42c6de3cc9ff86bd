"""Read the GLM-4-Voice decoder ``config.yaml`` (hyperpyyaml) without hyperpyyaml.

The released decoder folder describes its modules with hyperpyyaml tags
(``!new:cosyvoice.flow.flow.MaskedDiffWithXvec``, ``!ref <spk_embed_dim>``,
``!apply:torch.manual_seed [0]``...). Nothing here imports or calls the named classes: the
tags are parsed into :class:`TaggedNode` values and ``!ref`` references are resolved by
:mod:`mctp.codecs.glm4voice.hyperpyyaml` (re-exported here), then the sizes are copied into
small frozen dataclasses that the builders in ``flow.py`` and ``hift.py`` turn into modules.
Keys the config omits take the defaults of the original constructors (as hyperpyyaml would),
and every value this port does not implement raises a ``ValueError`` naming it instead of
being ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hyperpyyaml import TaggedNode, read_hyperpyyaml

__all__ = [
    "DecoderConfig",
    "EncoderConfig",
    "EstimatorConfig",
    "FlowConfig",
    "HiFTConfig",
    "TaggedNode",
    "load_decoder_config",
    "parse_decoder_config",
    "read_hyperpyyaml",
]


@dataclass(frozen=True)
class EncoderConfig:
    """Block conformer encoder (``cosyvoice.transformer.encoder.BlockConformerEncoder``).

    Attributes:
        input_size: Width of the token embeddings fed to the input linear layer.
        output_size: Model width ``D``.
        attention_heads: Number of heads (``D`` must be divisible by it).
        linear_units: Feed-forward hidden width.
        num_blocks: Number of layers.
        block_size: Attention block size in tokens (block-causal mask).
        activation: Feed-forward activation (``"swish"``, ``"relu"``, ``"gelu"``, ``"tanh"``).
        key_bias: Whether ``linear_k`` has a bias.
    """

    input_size: int
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    block_size: int
    activation: str = "swish"
    key_bias: bool = True


@dataclass(frozen=True)
class EstimatorConfig:
    """1-D U-Net transformer estimator (``cosyvoice.flow.decoder.ConditionalDecoder``).

    Attributes:
        in_channels: Input channels (x, mu, speaker, condition stacked: 4 x mel bins).
        out_channels: Output channels (mel bins).
        channels: Widths of the down path (the up path mirrors it).
        attention_head_dim: Width of one attention head.
        n_blocks: Transformer blocks per U-Net stage.
        num_mid_blocks: Number of middle stages.
        num_heads: Attention heads.
        act_fn: Feed-forward activation (``"gelu"`` or ``"gelu-approximate"``).
    """

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    attention_head_dim: int
    n_blocks: int
    num_mid_blocks: int
    num_heads: int
    act_fn: str = "gelu"


@dataclass(frozen=True)
class FlowConfig:
    """Token-to-mel flow model (``cosyvoice.flow.flow.MaskedDiffWithXvec``).

    Attributes:
        vocab_size: Number of speech token ids.
        input_size: Token embedding width.
        output_size: Mel bins.
        spk_embed_dim: Speaker embedding width (x-vector, 192).
        input_frame_rate: Tokens per second.
        encoder: Encoder sizes.
        regulator_channels: Channels of the interpolate regulator.
        regulator_layers: Number of conv+GroupNorm+Mish stages (``len(sampling_ratios)``).
        regulator_out_channels: Output channels of the regulator's last 1x1 conv.
        regulator_groups: GroupNorm groups of the regulator.
        spk_emb_dim: Width of the projected speaker embedding the estimator sees.
        inference_cfg_rate: Classifier-free guidance rate.
        t_scheduler: ``"cosine"`` or ``"linear"`` time grid.
        estimator: Estimator sizes.
    """

    vocab_size: int
    input_size: int
    output_size: int
    spk_embed_dim: int
    input_frame_rate: float
    encoder: EncoderConfig
    regulator_channels: int
    regulator_layers: int
    regulator_out_channels: int
    regulator_groups: int
    spk_emb_dim: int
    inference_cfg_rate: float
    t_scheduler: str
    estimator: EstimatorConfig


@dataclass(frozen=True)
class HiFTConfig:
    """HiFT vocoder (``cosyvoice.hifigan.generator.HiFTGenerator``) and its F0 predictor.

    Attributes:
        in_channels: Mel bins.
        base_channels: Width after ``conv_pre``; halved by every upsampling stage.
        nb_harmonics: Harmonics above the fundamental in the NSF source.
        sampling_rate: Output sample rate (Hz).
        nsf_alpha: Sine amplitude of the source.
        nsf_sigma: Noise std in voiced regions.
        nsf_voiced_threshold: F0 (Hz) above which a sample counts as voiced.
        upsample_rates: Transposed-conv strides.
        upsample_kernel_sizes: Transposed-conv kernels.
        n_fft: iSTFT size.
        hop_len: iSTFT hop.
        resblock_kernel_sizes: Kernels of the resblocks of each stage.
        resblock_dilation_sizes: Dilations of those resblocks.
        source_resblock_kernel_sizes: Kernels of the source resblocks.
        source_resblock_dilation_sizes: Dilations of the source resblocks.
        lrelu_slope: Leaky-ReLU slope inside the upsampling stages.
        audio_limit: Output clamp.
        f0_in_channels: Input channels of the F0 predictor.
        f0_cond_channels: Width of the F0 predictor's conv stack.
    """

    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    f0_in_channels: int
    f0_cond_channels: int

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame (``prod(upsample_rates) * hop_len``)."""
        return math.prod(self.upsample_rates) * self.hop_len


@dataclass(frozen=True)
class DecoderConfig:
    """Everything the GLM-4-Voice decoder adapter needs from ``config.yaml``.

    Attributes:
        sample_rate: Output sample rate (top-level ``sample_rate``).
        flow: Flow model sizes.
        hift: Vocoder sizes.
    """

    sample_rate: int
    flow: FlowConfig
    hift: HiFTConfig


class _Section:
    """Typed access to one tagged mapping with the original constructor's defaults."""

    def __init__(self, node: Any, path: str, expected_class: str) -> None:
        if not isinstance(node, TaggedNode) or node.kind != "new":
            raise ValueError(f"config.yaml: {path} must be a !new:...{expected_class} node")
        if node.class_name != expected_class:
            raise ValueError(
                f"config.yaml: {path} is {node.target}, only {expected_class} is supported"
            )
        value = node.value if node.value is not None else {}
        if not isinstance(value, dict):
            raise ValueError(f"config.yaml: {path} must take keyword arguments (a mapping)")
        self.values: dict[str, Any] = value
        self.path = path

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.values:
            return self.values[key]
        if default is ...:
            raise ValueError(f"config.yaml: {self.path}.{key} is missing")
        return default

    def integer(self, key: str, default: Any = ..., *, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"config.yaml: {self.path}.{key} must be an integer >= {minimum}, got {value!r}"
            )
        return value

    def number(self, key: str, default: Any = ...) -> float:
        value = self.get(key, default)
        if isinstance(value, str):
            try:
                value = float(value)  # PyYAML reads "1e-06" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"config.yaml: {self.path}.{key} must be a number, got {value!r}")
        return float(value)

    def ints(self, key: str, default: Any = ..., *, nested: bool = False) -> tuple[Any, ...]:
        value = self.get(key, default)
        rows = value if nested else [value]
        ok = isinstance(value, list | tuple) and all(
            isinstance(row, list | tuple)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in row)
            for row in rows
        )
        if not ok:
            what = "a list of lists" if nested else "a list"
            raise ValueError(
                f"config.yaml: {self.path}.{key} must be {what} of positive integers, got {value!r}"
            )
        return tuple(tuple(row) for row in value) if nested else tuple(value)

    def require(self, key: str, allowed: tuple[Any, ...], default: Any = ...) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise ValueError(
                f"config.yaml: {self.path}.{key}={value!r} is not supported (supported: {allowed})"
            )
        return value


def _encoder_config(node: Any) -> EncoderConfig:
    sec = _Section(node, "flow.encoder", "BlockConformerEncoder")
    sec.require("input_layer", ("linear",), "conv2d")
    sec.require("pos_enc_layer_type", ("rel_pos_espnet",), "rel_pos")
    sec.require("selfattention_layer_type", ("block_rel_selfattn",), "rel_selfattn")
    sec.require("normalize_before", (True,), True)
    sec.require("use_cnn_module", (False,), True)
    sec.require("macaron_style", (False,), True)
    sec.require("static_chunk_size", (0,), 0)
    sec.require("use_dynamic_chunk", (False,), False)
    sec.require("global_cmvn", (None,), None)
    cfg = EncoderConfig(
        input_size=sec.integer("input_size"),
        output_size=sec.integer("output_size", 256),
        attention_heads=sec.integer("attention_heads", 4),
        linear_units=sec.integer("linear_units", 2048),
        num_blocks=sec.integer("num_blocks", 6),
        block_size=sec.integer("block_size", 25),
        activation=sec.require("activation_type", ("swish", "relu", "gelu", "tanh"), "swish"),
        key_bias=bool(sec.require("key_bias", (True, False), True)),
    )
    if cfg.output_size % cfg.attention_heads:
        raise ValueError(
            f"config.yaml: flow.encoder.output_size ({cfg.output_size}) must be divisible by "
            f"attention_heads ({cfg.attention_heads})"
        )
    return cfg


def _estimator_config(node: Any) -> EstimatorConfig:
    sec = _Section(node, "flow.decoder.estimator", "ConditionalDecoder")
    cfg = EstimatorConfig(
        in_channels=sec.integer("in_channels"),
        out_channels=sec.integer("out_channels"),
        channels=sec.ints("channels", [256, 256]),
        attention_head_dim=sec.integer("attention_head_dim", 64),
        n_blocks=sec.integer("n_blocks", 1, minimum=0),
        num_mid_blocks=sec.integer("num_mid_blocks", 2, minimum=0),
        num_heads=sec.integer("num_heads", 4),
        act_fn=sec.require("act_fn", ("gelu", "gelu-approximate"), "snake"),
    )
    if cfg.in_channels % 2:
        raise ValueError(f"config.yaml: estimator in_channels ({cfg.in_channels}) must be even")
    bad = [c for c in cfg.channels if c % 8]
    if bad:
        raise ValueError(
            f"config.yaml: estimator channels {cfg.channels} must be multiples of 8 (GroupNorm(8))"
        )
    return cfg


def _flow_config(node: Any) -> FlowConfig:
    sec = _Section(node, "flow", "MaskedDiffWithXvec")
    encoder = _encoder_config(sec.get("encoder"))
    reg = _Section(sec.get("length_regulator"), "flow.length_regulator", "InterpolateRegulator")
    ratios = reg.get("sampling_ratios")
    if not isinstance(ratios, list | tuple):
        raise ValueError(
            f"config.yaml: flow.length_regulator.sampling_ratios must be a list, got {ratios!r}"
        )
    channels = reg.integer("channels")
    out_channels = reg.get("out_channels", None)
    cfm = _Section(sec.get("decoder"), "flow.decoder", "ConditionalCFM")
    params_node = cfm.get("cfm_params")
    params = params_node.value if isinstance(params_node, TaggedNode) else params_node
    if isinstance(params, dict) and set(params) == {"content"}:
        params = params["content"]  # !new:omegaconf.DictConfig {content: {...}}
    if not isinstance(params, dict):
        raise ValueError(
            f"config.yaml: flow.decoder.cfm_params must be a mapping, got {params_node!r}"
        )
    cfm_params = _Section(
        TaggedNode("new", "DictConfig", params), "flow.decoder.cfm_params", "DictConfig"
    )
    cfm_params.require("solver", ("euler",), "euler")
    n_spks = cfm.integer("n_spks", 1)
    if n_spks != 1:
        raise ValueError(f"config.yaml: flow.decoder.n_spks={n_spks} is not supported (only 1)")
    cfg = FlowConfig(
        vocab_size=sec.integer("vocab_size", 4096),
        input_size=sec.integer("input_size", 512),
        output_size=sec.integer("output_size", 80),
        spk_embed_dim=sec.integer("spk_embed_dim", 192),
        input_frame_rate=sec.number("input_frame_rate", 50),
        encoder=encoder,
        regulator_channels=channels,
        regulator_layers=len(ratios),
        regulator_out_channels=channels if out_channels is None else reg.integer("out_channels"),
        regulator_groups=reg.integer("groups", 1),
        spk_emb_dim=cfm.integer("spk_emb_dim", 64),
        inference_cfg_rate=cfm_params.number("inference_cfg_rate"),
        t_scheduler=cfm_params.require("t_scheduler", ("cosine", "linear"), "linear"),
        estimator=_estimator_config(cfm.get("estimator")),
    )
    _check_flow(cfg)
    return cfg


def _check_flow(cfg: FlowConfig) -> None:
    mel = cfg.output_size
    problems = []
    if cfg.input_frame_rate <= 0:
        problems.append(f"input_frame_rate ({cfg.input_frame_rate}) must be positive")
    if cfg.encoder.input_size != cfg.input_size:
        problems.append(
            f"encoder.input_size ({cfg.encoder.input_size}) != input_size ({cfg.input_size})"
        )
    if cfg.regulator_channels != mel or cfg.regulator_out_channels != mel:
        problems.append(
            f"length_regulator channels ({cfg.regulator_channels} -> {cfg.regulator_out_channels}) "
            f"must equal output_size ({mel})"
        )
    if cfg.regulator_channels % cfg.regulator_groups:
        problems.append(
            f"length_regulator groups ({cfg.regulator_groups}) must divide its channels"
        )
    if cfg.spk_emb_dim != mel:
        problems.append(f"decoder.spk_emb_dim ({cfg.spk_emb_dim}) must equal output_size ({mel})")
    if cfg.estimator.in_channels != 3 * mel + cfg.spk_emb_dim:
        problems.append(
            f"estimator.in_channels ({cfg.estimator.in_channels}) must be x + mu + cond + speaker "
            f"= {3 * mel + cfg.spk_emb_dim}"
        )
    if cfg.estimator.out_channels != mel:
        problems.append(
            f"estimator.out_channels ({cfg.estimator.out_channels}) != output_size ({mel})"
        )
    if problems:
        raise ValueError("config.yaml: inconsistent flow sizes: " + "; ".join(problems))


def _hift_config(node: Any, sample_rate: int) -> HiFTConfig:
    sec = _Section(node, "hift", "HiFTGenerator")
    f0 = _Section(sec.get("f0_predictor"), "hift.f0_predictor", "ConvRNNF0Predictor")
    f0.require("num_class", (1,), 1)
    istft = sec.get("istft_params", {"n_fft": 16, "hop_len": 4})
    if not isinstance(istft, dict):
        raise ValueError(f"config.yaml: hift.istft_params must be a mapping, got {istft!r}")
    istft_sec = _Section(TaggedNode("new", "istft", istft), "hift.istft_params", "istft")
    cfg = HiFTConfig(
        in_channels=sec.integer("in_channels", 80),
        base_channels=sec.integer("base_channels", 512),
        nb_harmonics=sec.integer("nb_harmonics", 8),
        sampling_rate=sec.integer("sampling_rate", 22050),
        nsf_alpha=sec.number("nsf_alpha", 0.1),
        nsf_sigma=sec.number("nsf_sigma", 0.003),
        nsf_voiced_threshold=sec.number("nsf_voiced_threshold", 10),
        upsample_rates=sec.ints("upsample_rates", [8, 8]),
        upsample_kernel_sizes=sec.ints("upsample_kernel_sizes", [16, 16]),
        n_fft=istft_sec.integer("n_fft"),
        hop_len=istft_sec.integer("hop_len"),
        resblock_kernel_sizes=sec.ints("resblock_kernel_sizes", [3, 7, 11]),
        resblock_dilation_sizes=sec.ints("resblock_dilation_sizes", [[1, 3, 5]] * 3, nested=True),
        source_resblock_kernel_sizes=sec.ints("source_resblock_kernel_sizes", [7, 11]),
        source_resblock_dilation_sizes=sec.ints(
            "source_resblock_dilation_sizes", [[1, 3, 5]] * 2, nested=True
        ),
        lrelu_slope=sec.number("lrelu_slope", 0.1),
        audio_limit=sec.number("audio_limit", 0.99),
        f0_in_channels=f0.integer("in_channels", 80),
        f0_cond_channels=f0.integer("cond_channels", 512),
    )
    problems = []
    if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
        problems.append("upsample_rates and upsample_kernel_sizes differ in length")
    if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
        problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
    if len(cfg.source_resblock_kernel_sizes) != len(cfg.upsample_rates) or len(
        cfg.source_resblock_dilation_sizes
    ) != len(cfg.upsample_rates):
        problems.append("one source resblock per upsampling stage is required")
    if cfg.base_channels % (2 ** len(cfg.upsample_rates)):
        problems.append(
            f"base_channels ({cfg.base_channels}) must halve {len(cfg.upsample_rates)} times"
        )
    if cfg.f0_in_channels != cfg.in_channels:
        problems.append(
            f"f0_predictor.in_channels ({cfg.f0_in_channels}) != in_channels ({cfg.in_channels})"
        )
    if cfg.n_fft % 2 or cfg.n_fft < cfg.hop_len:
        problems.append(f"istft n_fft ({cfg.n_fft}) must be even and >= hop_len ({cfg.hop_len})")
    if cfg.sampling_rate != sample_rate:
        problems.append(
            f"sampling_rate ({cfg.sampling_rate}) != top-level sample_rate ({sample_rate})"
        )
    if problems:
        raise ValueError("config.yaml: inconsistent hift sizes: " + "; ".join(problems))
    return cfg


def parse_decoder_config(text: str) -> DecoderConfig:
    """Build a :class:`DecoderConfig` from the text of a decoder ``config.yaml``.

    Args:
        text: hyperpyyaml text in the released layout (``flow:`` and ``hift:`` sections;
            other sections such as ``llm:`` are ignored).

    Returns:
        The parsed sizes.

    Raises:
        ValueError: If the text cannot be parsed, a section is missing, a module class or
            option is not supported by this port, or sizes are inconsistent.
    """
    data = read_hyperpyyaml(text)
    for key in ("flow", "hift"):
        if key not in data:
            raise ValueError(f"config.yaml: top-level {key!r} section is missing")
    sample_rate = data.get("sample_rate", 22050)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(
            f"config.yaml: sample_rate must be a positive integer, got {sample_rate!r}"
        )
    flow = _flow_config(data["flow"])
    hift = _hift_config(data["hift"], sample_rate)
    if hift.in_channels != flow.output_size:
        raise ValueError(
            f"config.yaml: hift.in_channels ({hift.in_channels}) != flow.output_size "
            f"({flow.output_size})"
        )
    return DecoderConfig(sample_rate=sample_rate, flow=flow, hift=hift)


def load_decoder_config(path: str | os.PathLike[str]) -> DecoderConfig:
    """Read ``config.yaml`` (or a folder holding it).

    Args:
        path: The file, or the decoder folder.

    Returns:
        The parsed sizes.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: See :func:`parse_decoder_config`.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"decoder config not found: {file}")
    return parse_decoder_config(file.read_text())
