"""Every ```python block of README.md, docs/*.md and examples/*/README.md runs as written.

The blocks of one file run in order, in one fresh namespace, in a subprocess started from the
repository root (so a block may use what an earlier block of the same file defined, and
nothing else). Files are found by glob: new documents are picked up automatically.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*/README.md")]
)
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)

_DRIVER = r"""
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
ns = {"__name__": "__docs__"}
for i, (line, code) in enumerate(blocks):
    try:
        exec(compile(code, f"{sys.argv[1]}:{line}", "exec"), ns)
    except BaseException:
        print(f"block {i + 1} (line {line}) of {sys.argv[1]} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` of every ```python block of ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_blocks_are_found():
    assert any(python_blocks(p) for p in DOCS)
    assert python_blocks(ROOT / "docs" / "mctp.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_blocks_run(doc: Path, tmp_path: Path) -> None:
    blocks = python_blocks(doc)
    if not blocks:
        pytest.skip("no python blocks")
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(doc.relative_to(ROOT))],
        input=json.dumps(blocks),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**_env(), "MCTP_DOCS_OUT": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-4000:]


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["HF_HUB_OFFLINE"] = "1"  # the docs never download
    return env
