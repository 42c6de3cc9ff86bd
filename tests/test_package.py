"""Packaging: the namespace mapping from a wheel, import weight, README's usage example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_all_four_namespaces(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("mctp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for path in (
        "mctp/codecs/glm4voice/tokenizer.py",
        "mctp/interleave/schedule.py",
        "mctp/backbones/hf.py",
    ):
        assert path in names
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import mctp, mctp.interleave, mctp.codecs, mctp.backbones, mctp.codecs.glm4voice.tokenizer\n"
        "print(mctp.__file__); print(mctp.codecs.__file__); print(mctp.MCTPStack.__module__)"
    )
    printed = _run(code, elsewhere, env).split()
    assert printed[0].startswith(str(site)) and printed[1].startswith(str(site))
    assert printed[2] == "mctp.stack"


def test_imports_from_a_checkout_without_install(tmp_path):
    # From the repository root the root's mctp/ is imported first; it must still find codecs/.
    code = "import mctp, mctp.codecs, mctp.backbones, mctp.interleave; print(mctp.codecs.__file__)"
    assert _run(code, ROOT).strip() == str(ROOT / "codecs" / "__init__.py")
    assert (
        _run("import codecs; print(codecs.__name__)", ROOT).strip() == "codecs"
    )  # stdlib untouched


def test_import_weight():
    code = (
        "import sys, mctp.interleave\n"
        "heavy = [m for m in ('torch', 'numpy', 'transformers', 'einops') if m in sys.modules]\n"
        "import mctp; mctp.MCTPStack; mctp.generate\n"
        "extra = [m for m in ('transformers', 'peft', 'soundfile', 'safetensors', 'soxr') if m in sys.modules]\n"
        "print(heavy, extra)"
    )
    assert _run(code, ROOT).strip() == "[] []"


def test_readme_usage_example_runs():
    text = (ROOT / "README.md").read_text()
    usage = text[text.index("## Usage") :]
    block = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    assert 15 <= len(block.strip().splitlines()) <= 30
    exec(compile(block, "README.md", "exec"), {})


def test_readme_commands_match_ci():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "python -m mctp.demo" in commands[0]


def _module_imports(path: Path, package: str) -> set[str]:
    """Modules of ``mctp`` and ``mctp.engine`` that ``path`` imports anywhere (module level,
    inside functions, under ``TYPE_CHECKING``), as dotted names relative to ``mctp``."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            name = ".".join([*base, node.module])
        else:
            name = node.module
        if name.startswith("mctp."):
            parts = name.split(".")[1:]
            out.add(".".join(parts[:2]) if parts[0] == "engine" else parts[0])
    return out


def test_core_modules_import_no_circle():
    """The core (mctp/*.py) and the engine (mctp/engine/*.py) form an acyclic import graph,
    counting every import (also inside functions and under TYPE_CHECKING): decoding and stack,
    generator and segmenter used to import each other; losses does not import the stack."""
    mods = {p.stem: _module_imports(p, "mctp") for p in (ROOT / "mctp").glob("*.py")}
    mods |= {
        f"engine.{p.stem}": _module_imports(p, "mctp.engine")
        for p in (ROOT / "mctp" / "engine").glob("*.py")
    }
    graph = {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}
    assert "engine.generator" in graph and "stack" in graph
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, f"import circle: {' -> '.join([*path, m])}"
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "stack" not in (ROOT / "mctp" / "losses.py").read_text().split("__all__")[0]
