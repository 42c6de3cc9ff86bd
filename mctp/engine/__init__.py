"""The generation engine: settings, decode state, schedule loop, fast path, streaming.

``mctp.engine`` holds everything that runs a backbone and its MCTP heads at inference time:
the engine and request settings (:mod:`~mctp.engine.generation_config`), the token buffer and
caches, the heads' incremental decoder, token choice, the fixed-shape fast path, the
:class:`~mctp.engine.generator.Generator` (its schedule loop in :mod:`~mctp.engine.run`, its
streamed calls in :mod:`~mctp.engine.stream_loop`, mid-flight joins in
:mod:`~mctp.engine.joins`) and its one-shot forms ``generate`` and ``generate_stream``, batched
cohorts, and the stream segmenter. The public names are re-exported by ``mctp``.
"""
