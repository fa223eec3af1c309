import os
import subprocess
import sys

from liverkd import __version__

CORE = "liverkd, liverkd.core.volume, liverkd.core.preprocess, liverkd.core.metrics, liverkd.core.spec, liverkd.cli"


def test_core_and_cli_import_without_torch():
    code = f"import sys; import {CORE}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing the core pulled in torch: {out.stdout.strip()}"


def test_help_lists_every_command(liverkd_cmd):
    from liverkd.cli import app

    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    names += [g.name or g.typer_instance.info.name for g in app.registered_groups]
    assert "evaluate" in names
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([*liverkd_cmd, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    missing = [name for name in names if name not in out.stdout]
    assert not missing, f"commands missing from --help: {missing}"


def test_version(liverkd_cmd):
    out = subprocess.run([*liverkd_cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"liverkd {__version__}"
