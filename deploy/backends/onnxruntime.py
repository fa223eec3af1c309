from __future__ import annotations

import os

import numpy as np
from liverkd.deploy.backends.base import Runner, RunnerError


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime: CPU provider by default; CUDA/TensorRT providers where installed and asked for."""

    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None, threads: int | None = None, spin: bool = False):
        super().__init__()
        self.providers = providers
        self.threads = threads
        self.spin = spin
        self.session = None

    def load(self, bundle) -> OnnxRuntimeRunner:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RunnerError(f"onnxruntime is not installed ({e})") from None
        path = bundle.onnx_for_runtime
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads or (os.cpu_count() or 1)
        opts.log_severity_level = 3
        # Idle worker threads spin by default, taking cores from the numpy/scipy stages between
        # two runs and from anything else on a small CPU; off measured faster here (issue 6 sweep).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        available = ort.get_available_providers()
        providers = self.providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise RunnerError(f"ONNX Runtime providers not available here: {missing} (have {available})")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:
            raise RunnerError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        self.precision = bundle.precision
        return self

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def close(self) -> None:
        self.session = None
