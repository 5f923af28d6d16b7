"""The package's import graph: no two modules import each other (issue 26: ``toy.best`` ↔ ``toy.demo``)."""

import ast
from pathlib import Path

import cav

ROOT = Path(cav.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The cav modules ``path`` imports anywhere in it (function-local imports too: they still tie the two)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def test_no_two_modules_import_each_other():
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: _imports(path, name, set(paths)) for name, path in paths.items()}
    assert "cav.metrics.toy" in graph["cav.toy.best"]  # the walk sees imports (here: best's scorer)
    mutual = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph[b]})
    assert mutual == []


def test_every_module_imports_first():
    """Each module imports in a process where no cav module is loaded yet (a cycle of three or more modules at
    import time fails only when one of them is imported first: ``adapters.lora`` → ``families`` → ``image_lora``)."""
    import subprocess
    import sys

    names = sorted(_module_name(p) for p in ROOT.rglob("*.py") if "ui" not in p.relative_to(ROOT).parts[:1])
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'cav' or m.startswith('cav.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        failed.append(f'{name}: {exc}')\n"
        "print('\\n'.join(failed))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
