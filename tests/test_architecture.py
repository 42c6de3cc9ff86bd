"""Which package may import which (docs/architecture.md), checked on the source with ``ast``.

Every import of every library module counts: module level, inside functions and methods, under
``TYPE_CHECKING``, and ``importlib.import_module("...")`` / ``__import__("...")`` calls with a
literal name. The rules, with the layers of :func:`layer`:

1. The core (the ``mctp`` model parts, ``mctp.engine``, ``mctp.interleave``) imports only the core.
2. ``mctp.interleave`` imports nothing of mctp but itself (pure Python).
3. An adapter (``mctp.codecs``, ``mctp.backbones``) imports only the core and its own package.
4. No library module imports the examples.
5. ``mctp.serve`` and ``mctp.eval`` import, of mctp, only themselves, ``mctp.codecs`` and the
   public names of ``mctp.speech`` (``from mctp.speech import X``, ``X`` in its ``__all__``):
   they reach the engine through the speech pipeline's API only.
6. Apps import each other in one direction: ``mctp.training`` and ``mctp.speech`` import no
   other app; ``mctp.vllm`` (its speech engine serves ``mctp serve --engine vllm``) only
   ``mctp.speech`` and ``mctp.serve``, which never import it.
7. Nothing in the library imports the entry points ``mctp.cli`` and ``mctp.demo``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> folder of the repository (pyproject's package-dir mapping).
LIBRARY = {
    "mctp": "mctp",
    "mctp.interleave": "interleave",
    "mctp.codecs": "codecs",
    "mctp.backbones": "backbones",
}
ADAPTERS = ("codecs", "backbones")
# app -> the other apps it may import (serve and eval: rule 5; entry points: any)
APP_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "training": (),
    "speech": (),
    "vllm": ("speech", "serve"),
}
FRONT_APPS = ("serve", "eval")
ENTRY_POINTS = ("cli", "demo")
APPS = (*APP_DEPENDENCIES, *FRONT_APPS, *ENTRY_POINTS)
# The examples' packages, also under the names they have when examples/ is on sys.path.
EXAMPLES = ("examples", *sorted(p.name for p in (ROOT / "examples").iterdir() if p.is_dir()))


@dataclass(frozen=True)
class Import:
    """One import statement (or literal ``import_module`` call) of one library module.

    Attributes:
        module: Dotted name of the importing module (``mctp.serve.protocol``).
        path: Its file, relative to the repository root.
        line: Line of the statement.
        target: Absolute dotted name of the module imported (relative imports resolved).
        names: The names a ``from`` import takes (``()`` for ``import x``).
    """

    module: str
    path: str
    line: int
    target: str
    names: tuple[str, ...] = ()

    def __str__(self) -> str:
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else self.target
        return f"{self.path}:{self.line}: {self.module} imports {what}"


def layer(module: str) -> str:
    """The layer of a dotted module name: ``core``, ``adapter``, ``app``, ``examples`` or
    ``external`` (anything outside mctp). A new top-level module of ``mctp/`` counts as core
    unless it is listed as an app, so it is held to the strictest rule by default."""
    parts = module.split(".")
    if parts[0] in EXAMPLES:
        return "examples"
    if parts[0] != "mctp":
        return "external"
    if len(parts) == 1:
        return "core"
    if parts[1] in ADAPTERS:
        return "adapter"
    if parts[1] in APPS:
        return "app"
    return "core"


def _literal_import_call(node: ast.Call) -> str | None:
    """The literal module name of ``import_module("x")`` / ``__import__("x")``, else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def imports_of(
    source: str, module: str, *, is_package: bool = False, path: str = ""
) -> list[Import]:
    """Every import of one module's source, wherever it stands in the file.

    Args:
        source: The module's Python source.
        module: Its dotted name (relative imports are resolved against it).
        is_package: Whether the source is a package's ``__init__.py``.
        path: The file, for messages.

    Returns:
        One :class:`Import` per imported module, in the order of the file.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, path, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            names = tuple(a.name for a in node.names)
            found.append(Import(module, path, node.lineno, target, names))
        elif isinstance(node, ast.Call) and (name := _literal_import_call(node)):
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                base = package.split(".")
                name = ".".join([*base[: len(base) - (level - 1)], name.lstrip(".")])
            found.append(Import(module, path, node.lineno, name))
    return sorted(found, key=lambda i: i.line)


def _library_files() -> list[tuple[str, bool, Path]]:
    """``(dotted name, is a package, file)`` of every module of the four library packages."""
    out = []
    for pkg, folder in LIBRARY.items():
        for file in sorted((ROOT / folder).rglob("*.py")):
            parts = list(file.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            out.append((".".join([pkg, *(parts[:-1] if is_package else parts)]), is_package, file))
    return out


def library_modules() -> set[str]:
    """Every dotted module name of the library."""
    return {name for name, _, _ in _library_files()}


def library_imports() -> list[Import]:
    """The imports of every module of the four library packages (their folders walked)."""
    out: list[Import] = []
    for name, is_package, file in _library_files():
        rel = str(file.relative_to(ROOT))
        out += imports_of(file.read_text(), name, is_package=is_package, path=rel)
    return out


def _sub(module: str) -> str:
    """``mctp.serve.app`` -> ``serve``; ``mctp`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _expanded(imp: Import, modules: set[str]) -> list[str]:
    """The modules an import reaches: ``from mctp.engine import generator`` reaches
    ``mctp.engine.generator``; ``from mctp.engine.sampling import greedy`` reaches
    ``mctp.engine.sampling``."""
    subs = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules]
    return subs or [imp.target]


def violations(imports: Iterable[Import], speech_public: set[str], modules: set[str]) -> list[str]:
    """The imports that break a rule of this module's docstring, each with the rule.

    Args:
        imports: The imports to check.
        speech_public: ``mctp.speech.__all__``.
        modules: Every dotted module name of the library (to tell a submodule from a name).

    Returns:
        ``"<file>:<line>: <module> imports <what> (<rule>)"`` per offending import.
    """
    bad: list[str] = []
    for imp in imports:
        src, src_layer = imp.module, layer(imp.module)
        for target in _expanded(imp, modules):
            dst = layer(target)
            if dst == "external" or target == src:
                continue
            rule = None
            if dst == "examples":
                rule = "the library never imports the examples"
            elif src.startswith("mctp.interleave") and not target.startswith("mctp.interleave"):
                rule = "mctp.interleave is pure Python and imports nothing else of mctp"
            elif src_layer == "core" and dst != "core":
                rule = "the core imports only the core"
            elif src_layer == "adapter" and dst != "core" and _sub(target) != _sub(src):
                rule = "an adapter imports only the core and its own package"
            elif _sub(target) in ENTRY_POINTS and _sub(target) != _sub(src):
                rule = "nothing imports the entry points mctp.cli and mctp.demo"
            elif _sub(src) in FRONT_APPS and _sub(target) != _sub(src):
                public = target == "mctp.speech" and set(imp.names) <= speech_public
                if not (public and imp.names) and _sub(target) != "codecs":
                    rule = (
                        f"mctp.{_sub(src)} reaches the engine only through mctp.speech's public "
                        "API: import from mctp.speech the names in its __all__ (or mctp.codecs)"
                    )
            elif (
                _sub(src) in APP_DEPENDENCIES
                and dst == "app"
                and _sub(target) not in (_sub(src), *APP_DEPENDENCIES[_sub(src)])
            ):
                allowed = [f"mctp.{a}" for a in APP_DEPENDENCIES[_sub(src)]]
                rule = f"mctp.{_sub(src)} imports no other app" + (
                    f" than {' and '.join(allowed)}" if allowed else ""
                )
            if rule:
                bad.append(f"{imp} ({rule})")
    return bad


def _speech_public() -> set[str]:
    tree = ast.parse((ROOT / "mctp" / "speech" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("mctp/speech/__init__.py has no __all__")


def test_the_library_keeps_the_import_rules():
    imports, modules = library_imports(), library_modules()
    # the walk reached every package, function-level imports included (no vacuous pass)
    for name in ("mctp.stack", "mctp.engine.generator", "mctp.serve.protocol", "mctp.eval.run"):
        assert name in modules
    assert any(m.startswith("mctp.codecs.glm4voice.") for m in modules)
    assert any(i.module == "mctp.serve.protocol" and i.target == "mctp.speech" for i in imports)
    bad = violations(imports, _speech_public(), modules)
    assert not bad, "imports that break docs/architecture.md's rules:\n" + "\n".join(bad)


def test_lazy_exports_of_mctp_point_into_the_core():
    import mctp

    targets = {f"mctp.{m}" for m in mctp._EXPORTS.values()}
    assert "mctp.speech_vocab" in targets
    assert {t for t in targets if layer(t) != "core"} == set()


def test_every_rule_can_fail():
    """Fake modules with one offending import per rule: each is reported with its line."""
    fake = {
        "mctp.stack": "import torch\nfrom mctp.speech import SpeechPipeline\n",
        "mctp.engine.generator": "def f():\n    from mctp.backbones import HFBackbone\n",
        "mctp.interleave.schedule": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from mctp.stack import MCTPStack\n",
        "mctp.codecs.audio": "import importlib\nm = importlib.import_module('mctp.training')\n",
        "mctp.backbones.hf": "\n\nfrom ..codecs import audio\n",
        "mctp.speech.pipeline": "from examples.vita_audio.model import VitaAudio\n",
        "mctp.serve.protocol": "def g():\n    from mctp.engine.generation_config import EngineConfig\n",
        "mctp.serve.app": "from mctp.speech.batching import SpeechBatcher\n",
        "mctp.eval.run": "class A:\n    def m(self):\n        from mctp import generate\n",
        "mctp.eval.metrics": "from mctp.speech import SpeechPipeline, Secret\n",
        "mctp.training.model": "from vita_audio.checkpoint import load\n",
        "mctp.vllm.engine": "from mctp.training import MCTPTrainer\n",
        "mctp.speech.builders": "def b():\n    from mctp.serve.worker import Job\n",
        "mctp.speech.tiny": "from mctp.demo import teach_answer\n",
    }
    imports = [i for m, src in fake.items() for i in imports_of(src, m, path=m)]
    modules = set(fake) | {"mctp.codecs", "mctp.speech", "mctp.speech.batching"}
    bad = violations(imports, {"SpeechPipeline"}, modules)
    assert len(bad) == len(fake), "\n".join(bad)
    expect = {
        "mctp.stack:2: mctp.stack imports from mctp.speech import SpeechPipeline": "the core",
        "mctp.engine.generator:2:": "the core imports only the core",
        "mctp.interleave.schedule:3:": "pure Python",
        "mctp.codecs.audio:2: mctp.codecs.audio imports mctp.training": "an adapter",
        "mctp.backbones.hf:3: mctp.backbones.hf imports from mctp.codecs import audio": "adapter",
        "mctp.speech.pipeline:1:": "never imports the examples",
        "mctp.serve.protocol:2:": "public API",
        "mctp.serve.app:1:": "public API",
        "mctp.eval.run:3: mctp.eval.run imports from mctp import generate": "public API",
        "mctp.eval.metrics:1:": "public API",
        "mctp.training.model:1:": "never imports the examples",
        "mctp.vllm.engine:1:": "mctp.vllm imports no other app than mctp.speech and mctp.serve",
        "mctp.speech.builders:2:": "mctp.speech imports no other app)",
        "mctp.speech.tiny:1:": "entry points",
    }
    for head, rule in expect.items():
        assert any(b.startswith(head) and rule in b for b in bad), (head, bad)


def test_allowed_imports_pass():
    fake = {
        "mctp.serve.protocol": "from mctp.speech import SpeechBatcher\nfrom mctp.codecs import to_mono\n"
        "from .worker import Job\nimport numpy\n",
        "mctp.speech.pipeline": "from mctp.engine.generator import Generator\n"
        "from mctp.backbones import HFBackbone\nfrom mctp.codecs import load_codec\n",
        "mctp.backbones.hf": "from mctp.stack import MCTPStack\nfrom .structure import output_path\n",
        "mctp.cli": "from mctp.serve import serve\nfrom mctp.eval import run_eval\n",
        "mctp.vllm.speech": "from mctp.serve.worker import Job\nfrom mctp.speech import SpeechRequest\n",
        "mctp.stack": "from .engine.masks import causal\nfrom mctp.speech_vocab import BOA\n",
        "mctp.interleave.schedule": "from .slots import Role\n",
    }
    imports = [i for m, src in fake.items() for i in imports_of(src, m, path=m)]
    assert len(imports) == 16
    assert violations(imports, {"SpeechBatcher"}, set(fake)) == []


def test_relative_imports_resolve():
    (a, b, c) = imports_of(
        "from . import x\nfrom ..stack import MCTPStack\nfrom .y import z\n",
        "mctp.engine",
        is_package=True,
    )
    assert (a.target, a.names) == ("mctp.engine", ("x",))
    assert (b.target, c.target) == ("mctp.stack", "mctp.engine.y")
    (d,) = imports_of("from ..stack import MCTPStack\n", "mctp.engine.generator")
    assert d.target == "mctp.stack"
    assert str(d) == ":1: mctp.engine.generator imports from mctp.stack import MCTPStack"
