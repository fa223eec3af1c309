"""benchmarks/gpu_check.py runs end to end in its CPU mode (the GPU machine runs the same code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_mode_writes_a_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--runs", "2", "--size", "16"]
    cmd += ["--presets", "student-30k", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| student-30k |")]
    variants = {line.split("|")[3].strip() for line in rows}
    assert {"torch fp32", "torch fp32 channels_last_3d", "onnxruntime CPU fp32"} <= variants
    for line in rows:
        host_ms = float(line.split("|")[4])
        assert host_ms > 0
    assert "torch fp16: fp16 needs CUDA" in text  # skipped variants say why
    assert "input (1, 1, 16, 16, 16)" in text
