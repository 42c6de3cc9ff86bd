"""GLM-4-Voice-9B with MCTP heads, built on mctp (outside the library; never imported by it).

Put the ``examples/`` folder on ``sys.path`` and import the submodules, e.g.
``from glm4_voice.model import GLM4Voice`` or ``from glm4_voice.checkpoint import load_glm4_voice``.
"""
