"""A real tritonserver on this machine, from NVIDIA's nvidia-pytriton wheel (tests, the
benchmark and `liverkd triton-serve`; pytriton's own Python API is not used, only its binaries).

The wheel ships bin/tritonserver, the Python backend (no ONNX Runtime or TensorRT backend: export
the repository with `--network python`) and one backend stub per Python version. As pytriton
does, the stub matching this Python is put beside the backend, the wheel's shared libraries
(and this Python's libpython) go on LD_LIBRARY_PATH, and this Python's bin/ goes first on PATH,
which is how the stub's embedded interpreter finds this environment (its liverkd, its numpy).
The server listens on loopback only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from liverkd.core.errors import LiverkdError


class TritonServerError(LiverkdError):
    """No bundled tritonserver here, or it did not come up (the message says why, with its log's end)."""


def bundled_tritonserver() -> tuple[Path, Path]:
    """(the wheel's tritonserver folder, its shared libraries' folder), without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise TritonServerError(
            "nvidia-pytriton is not installed in this Python (`make test-triton` makes .venv-triton)"
        )
    root = Path(spec.origin).parent
    dist = root / "tritonserver"
    libs = next((p for p in (root.parent / "nvidia_pytriton.libs", dist / "external_libs") if p.is_dir()), None)
    if not (dist / "bin" / "tritonserver").is_file() or libs is None:
        raise TritonServerError(f"{root}: this pytriton has no bundled tritonserver (bin/tritonserver, its libraries)")
    return dist, libs


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTriton:
    """`with LocalTriton(repo) as server:` a tritonserver on 127.0.0.1 serving `repo`; `server.url`
    for tritonclient's HTTP client. Stopped (and its scratch folder removed) on exit."""

    def __init__(self, repository, *, http_port: int | None = None, grpc_port: int | None = None,
                 startup_timeout: float = 180.0, log_verbose: int = 0, quiet: bool = True):  # fmt: skip
        self.repository = Path(repository).resolve()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.quiet = quiet
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "tritonserver.log" if self.workdir else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def command(self, backends: Path, dist: Path) -> list[str]:
        return [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={dist / 'caches'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=20",
            f"--log-verbose={self.log_verbose}",
        ]

    def start(self) -> LocalTriton:
        dist, libs = bundled_tritonserver()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonServerError(
                f"the bundled Python backend has no stub for Python {version} ({stub.parent.parent})"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="liverkd-tritonserver-"))
        backends = self.workdir / "backends"
        shutil.copytree(dist / "backends", backends)
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        env = os.environ.copy()
        libdirs = [str(libs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(d for d in libdirs if d)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        log = open(self.log_path, "wb")  # noqa: SIM115 (the server writes it until stop)
        try:
            self.proc = subprocess.Popen(self.command(backends, dist), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # the log's end is in the error already
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TritonServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL to its process group after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc):
        self.stop()
