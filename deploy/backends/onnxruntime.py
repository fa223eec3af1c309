"""ONNX Runtime: CPU provider by default; CUDA/TensorRT providers where installed and asked for."""

from __future__ import annotations

import os

import numpy as np

from liverkd.deploy.backends.base import Runner, RunnerError, require
from liverkd.deploy.bundle import ModelFile


class OnnxRuntimeRunner(Runner):
    """One InferenceSession over the verified bytes of an ONNX file."""

    name = "onnxruntime"

    def __init__(self, model: ModelFile, *, providers: list[str] | None = None, threads: int | None = None,
                 spin: bool = False, **common):  # fmt: skip
        """`common`: precision, input_shape (Runner)."""
        super().__init__(model, **common)
        ort = require("onnxruntime", "pip install onnxruntime (or NVIDIA's onnxruntime-gpu)")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.log_severity_level = 3
        # Idle worker threads spin by default, taking cores from the numpy/scipy stages between
        # two runs and from anything else on a small CPU; off measured faster here (issue 6 sweep).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise RunnerError(f"ONNX Runtime providers not available here: {missing} (have {available})")
        data = model.read()
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail / InvalidGraph / ... types
            raise RunnerError(f"{model.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.accept_input_shape(model_input.shape)
        self.device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def close(self) -> None:
        self.session = None
