"""The library never imports the examples (recipes live outside it, torchtune-style)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Import name -> folder of the repository (pyproject's package-dir mapping).
LIBRARY = {
    "mctp": "mctp",
    "mctp.codecs": "codecs",
    "mctp.backbones": "backbones",
    "mctp.interleave": "interleave",
}

# Imports every module of the four packages (walking only their own folders), then reports
# what ended up in sys.modules.
_PROBE = r"""
import importlib, json, pkgutil, sys
from pathlib import Path

root = Path(sys.argv[1])
packages = json.loads(sys.argv[2])
imported, failed = [], {}
for name, folder in packages.items():
    importlib.import_module(name)
    for info in pkgutil.walk_packages([str(root / folder)], prefix=name + "."):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except ModuleNotFoundError as e:
            if info.name.startswith("mctp.vllm") and e.name == "vllm":
                continue  # the optional vLLM plugin without vLLM installed (extra [vllm])
            failed[info.name] = repr(e)
        except Exception as e:  # reported, the test fails on it
            failed[info.name] = repr(e)
files = {n: getattr(m, "__file__", None) or "" for n, m in list(sys.modules.items())}
print(json.dumps({"imported": imported, "failed": failed, "modules": files}))
"""


def test_library_imports_no_example(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT), json.dumps(LIBRARY)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["failed"], report["failed"]
    # The walk did reach the modules (a walk that finds nothing would pass vacuously).
    for name in (
        "mctp.stack",
        "mctp.engine.generation",
        "mctp.backbones.hf",
        "mctp.interleave.schedule",
    ):
        assert name in report["imported"]
    assert any(n.startswith("mctp.codecs.") for n in report["imported"])
    examples = str(ROOT / "examples")
    bad = sorted(
        name
        for name, file in report["modules"].items()
        if name.split(".")[0] in ("vita_audio", "examples")
        or "vita_audio" in name.split(".")
        or "examples" in name.split(".")
        or file.startswith(examples)
    )
    assert not bad, f"library imports pulled in example modules: {bad}"


def _imported_modules(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement and ``import_module``/``__import__`` call."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    for i, line in enumerate(source.splitlines(), start=1):
        found += [
            (i, m) for m in re.findall(r"(?:import_module|__import__)\(\s*[\"']([^\"']+)", line)
        ]
    return found


def _offends(module: str) -> bool:
    parts = module.lstrip(".").split(".")
    return parts[0] == "examples" or "vita_audio" in parts


def test_no_library_source_imports_examples():
    files = [p for folder in LIBRARY.values() for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 10
    offenders = [
        f"{p.relative_to(ROOT)}:{line}: {module}"
        for p in files
        for line, module in _imported_modules(p.read_text())
        if _offends(module)
    ]
    assert not offenders, offenders


def test_the_scan_catches_an_offending_import():
    source = (
        "import torch\n"
        "from vita_audio.checkpoint import load_vita_audio\n"
        "import examples.vita_audio.model\n"
        "m = importlib.import_module('vita_audio.model')\n"
        "from .builders import vita_audio_7b_heads\n"
    )
    flagged = {line for line, module in _imported_modules(source) if _offends(module)}
    assert flagged == {2, 3, 4}
