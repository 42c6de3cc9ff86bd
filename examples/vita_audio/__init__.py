"""VITA-Audio recipes built on mctp (outside the library; never imported by it).

Put the ``examples/`` folder on ``sys.path`` and import the submodules, e.g.
``from vita_audio.checkpoint import load_vita_audio`` or ``from vita_audio.model import VitaAudio``.
"""
