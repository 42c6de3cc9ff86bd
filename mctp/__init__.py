"""mctp: Multiple Cross-modal Token Prediction (VITA-Audio) for any speech LLM.

Importing ``mctp`` needs only ``torch`` and ``einops``. The sub-packages
``mctp.interleave`` (pure Python), ``mctp.codecs`` and ``mctp.backbones`` live in
top-level folders of the repository and are mapped into this namespace by
``pyproject.toml``; see README's "Layout" section.
"""

from __future__ import annotations

from pathlib import Path as _Path

# Running from a source checkout without an editable install (``python -c`` or
# ``python -m pytest`` from the repository root puts the root's ``mctp/`` first on
# sys.path): the sibling folders ``codecs/``, ``backbones/`` and ``interleave/`` are
# then not inside this package. Extending ``__path__`` with the repository root makes
# ``mctp.codecs`` resolve to ``<root>/codecs`` exactly as the installed mapping does.
_here = _Path(__file__).resolve().parent
if not (_here / "interleave").is_dir():
    _root = _here.parent
    if (_root / "pyproject.toml").is_file() and (_root / "interleave" / "__init__.py").is_file():
        __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821
del _Path, _here

__version__ = "0.1.0"
