"""The generation engine: settings, decode state, schedule loop, fast path, streaming.

``mctp.engine`` holds everything that runs a backbone and its MCTP heads at inference time:
the engine and request settings (:mod:`~mctp.engine.generation_config`), the token buffer and
caches, the heads' incremental decoder, token choice, the fixed-shape fast path, the
:class:`~mctp.engine.generator.Generator` and its one-shot forms ``generate`` and
``generate_stream``, and the stream segmenter. The public names are re-exported by ``mctp``.
"""
