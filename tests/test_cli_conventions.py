"""CLI conventions: `-h` on every command, flags shown without a type, and a missing optional
package (torch, matplotlib, onnx) one line naming the extra, never a traceback."""

import subprocess
import sys

import pytest
import typer
from conftest import HAVE_TORCH
from typer.testing import CliRunner

import liverkd.cli  # noqa: F401  (registers every command)
from liverkd.cli.app import app


def command_paths(command=None, path=()):
    """Every command and subcommand of the app, as argument lists: [], ['infer'], ['distill', 'run'], ..."""
    command = command or typer.main.get_command(app)
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


COMMANDS = list(command_paths())


def test_the_tree_is_walked():
    for expected in (["infer"], ["distill", "run"], ["data", "synth"], ["runner"], ["build-engine"], ["demo"]):
        assert expected in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "liverkd")
def test_every_command_has_h_and_no_bool_metavar(path):
    result = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--help" in result.output
    assert "<bool>" not in result.output


def test_options_with_values_keep_their_type():
    result = CliRunner().invoke(app, ["evaluate", "-h"], env={"COLUMNS": "120"})
    assert "<str>" in result.output  # --hd95 takes a value: its type is still shown


# ------------------------------------------------------------- missing optional packages

BLOCK = (
    "import sys\n"
    "for name in {blocked!r}:\n"
    "    sys.modules[name] = None  # any import of it now fails, as if not installed\n"
    "sys.argv = ['liverkd', *{args!r}]\n"
    "from liverkd.cli import main\n"
    "main()\n"
)


def liverkd_without(blocked, args, liverkd_cmd, cwd):
    """`liverkd ARGS` with the `blocked` modules uninstalled: for real where they are absent (torch
    under the Python 3.10 suite), else blocked in the child."""
    from importlib.util import find_spec

    if all(find_spec(m) is None for m in blocked):
        cmd = [*liverkd_cmd, *args]
    else:
        cmd = [sys.executable, "-c", BLOCK.format(blocked=list(blocked), args=list(args))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_one_line(proc, message):
    assert proc.returncode == 1, proc.stderr  # the epilog: 1 for a fact of this environment
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"error: {message}", proc.stderr
    assert len(lines) == 1, proc.stderr


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["model-info", "student-30k"], "liverkd model-info"),
        (["distill", "run", "quick"], "liverkd distill"),
        (["distill", "ablation", "quick"], "liverkd distill"),
        (
            ["build-engine", "x.pt", "--out", "engines/x"],
            "liverkd build-engine x.pt (a checkpoint: exported to ONNX first)",
        ),
        (["demo"], "liverkd demo"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_without_torch_one_line_naming_the_train_extra(args, what, liverkd_cmd, tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not read")
    proc = liverkd_without(["torch"], args, liverkd_cmd, tmp_path)
    assert_one_line(proc, f"{what} needs torch: pip install 'liverkd[train]'")
    assert not (tmp_path / "engines").exists() and not (tmp_path / "runs").exists()


def test_without_torch_the_runtime_still_answers(liverkd_cmd, tmp_path):
    proc = liverkd_without(["torch"], ["infer", "-h"], liverkd_cmd, tmp_path)
    assert proc.returncode == 0 and "--engine" in proc.stdout


def test_preview_without_matplotlib_names_the_plot_extra(liverkd_cmd, tmp_path):
    args = ["data", "synth", "--out", "phantoms", "--n", "1", "--shape", "16", "16", "16", "--preview"]
    proc = liverkd_without(["matplotlib"], args, liverkd_cmd, tmp_path)
    assert_one_line(proc, "--preview needs matplotlib: pip install 'liverkd[plot]'")
    assert not (tmp_path / "phantoms").exists()  # refused before a volume was written


def test_build_engine_without_onnx_names_the_build_extra(liverkd_cmd, tmp_path):
    proc = liverkd_without(["onnx"], ["build-engine", "student-30k", "--out", "engines/x"], liverkd_cmd, tmp_path)
    assert_one_line(proc, "liverkd build-engine needs onnx: pip install 'liverkd[build]'")


@pytest.mark.skipif(HAVE_TORCH, reason="checks the real thing where torch is absent (the Python 3.10 suite)")
def test_really_without_torch(liverkd_cmd, tmp_path):
    proc = subprocess.run([*liverkd_cmd, "model-info", "student-30k"], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line(proc, "liverkd model-info needs torch: pip install 'liverkd[train]'")


def test_quiet_is_accepted_and_quiet(liverkd_cmd, tmp_path):
    args = ["data", "synth", "--out", "phantoms", "--n", "2", "--shape", "16", "16", "16", "-q"]
    proc = subprocess.run([*liverkd_cmd, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout.startswith("wrote 2 cases")
