"""The import contract (tests/import_contract.py) holds on the source, and can fail."""

import textwrap
from pathlib import Path

from import_contract import violations

ROOT = Path(__file__).resolve().parents[1]


def test_the_source_keeps_the_contract():
    assert violations(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in ("liverkd", "distill", "deploy"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return tmp_path


def test_a_core_module_importing_torch_even_lazily_is_caught(tmp_path):
    root = _tree(tmp_path, {"liverkd/core/bad.py": "def f():\n    import torch\n    return torch\n"})
    found = violations(root)
    assert len(found) == 1 and "liverkd.core.bad imports torch" in found[0] and ":2:" in found[0]


def test_each_arrow_is_checked(tmp_path):
    root = _tree(
        tmp_path,
        {
            "liverkd/core/ui.py": "from rich.progress import track\n",
            "distill/up.py": "from liverkd.deploy import bundle\n",
            "deploy/up.py": "import liverkd.cli.app\n",
            "deploy/side.py": "from liverkd.distill.models import UNet3D\n",
            "deploy/export.py": "from liverkd.distill.models import UNet3D\nimport torch\n",
            "deploy/segment.py": "import torch\nimport numpy\n",
        },
    )
    lines = violations(root)
    found = "\n".join(lines)
    for bad in (
        "core.ui imports rich",
        "distill.up imports liverkd.deploy",
        "deploy.up imports liverkd.cli",
        "deploy.side imports liverkd.distill",
        "deploy.segment imports torch",
    ):
        assert bad in found
    assert not [line for line in lines if line.startswith("deploy/export.py") or "imports numpy" in line]
