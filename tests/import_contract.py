"""The import contract of DESIGN.md, read from the source with `ast` (every import, also the
ones inside functions): cli -> distill | deploy -> core, one way.

- liverkd.core imports only the standard library, numpy, scipy, nibabel and itself; its accel
  module alone also imports the optional accelerators (isal, cc3d) it falls back from, and
  its xp module alone CuPy (the GPU array module, only for arrays that are on a GPU already).
- liverkd.viz imports only the core (and matplotlib, its reason to exist, through liverkd.extras).
- liverkd.distill never imports liverkd.deploy or liverkd.cli.
- liverkd.deploy never imports liverkd.cli; it reaches liverkd.distill and torch only from
  export (and torch from its own torch backend).

`python tests/import_contract.py [ROOT]` prints the violations and exits 1 if there are any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FOLDERS = {"liverkd": "liverkd", "distill": "liverkd.distill", "deploy": "liverkd.deploy", "configs": "liverkd.configs"}
CORE_ALLOWED = {"numpy", "scipy", "nibabel", "liverkd.core"}
OPTIONAL_IN_CORE = {"liverkd.core.accel": {"isal", "cc3d"}, "liverkd.core.xp": {"cupy", "cupyx"}}
VIZ_ALLOWED = CORE_ALLOWED | {"matplotlib", "liverkd.extras"}
DISTILL_FROM_DEPLOY = {"liverkd.deploy.export"}
TORCH_IN_DEPLOY = {"liverkd.deploy.export", "liverkd.deploy.backends.torch"}


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def problem(module: str, imported: str) -> str | None:
    """Why `module` may not import `imported`, or None."""
    top = imported.split(".")[0]
    stdlib = top in sys.stdlib_module_names and top != "liverkd"
    allowed = CORE_ALLOWED | OPTIONAL_IN_CORE.get(module, set())
    if within(module, ["liverkd.core"]) and not (stdlib or within(imported, allowed)):
        return "the core imports only the standard library, numpy, scipy and nibabel (accel: isal, cc3d; xp: cupy)"
    if module == "liverkd.viz" and not (stdlib or within(imported, VIZ_ALLOWED)) and top == "liverkd":
        return "liverkd.viz builds on the core only"
    if within(module, ["liverkd.distill"]) and within(imported, ["liverkd.deploy", "liverkd.cli"]):
        return "distill is below cli and beside deploy"
    if within(module, ["liverkd.deploy"]):
        if within(imported, ["liverkd.cli"]):
            return "deploy is below cli"
        if within(imported, ["liverkd.distill"]) and module not in DISTILL_FROM_DEPLOY:
            return "deploy reaches distill only from export"
        if top == "torch" and module not in TORCH_IN_DEPLOY:
            return "deploy runs without torch (only export and the torch backend import it)"
    return None


def violations(root) -> list[str]:
    root = Path(root)
    out = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            module = module_name(root, path)
            for line, imported in imports_of(path):
                why = problem(module, imported)
                if why:
                    out.append(f"{path.relative_to(root)}:{line}: {module} imports {imported}: {why}")
    return out


if __name__ == "__main__":
    found = violations(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    print("\n".join(found) or "import contract holds")
    sys.exit(1 if found else 0)
