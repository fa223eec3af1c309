"""ONNX Runtime: CPU provider by default; CUDA/TensorRT providers where installed and asked for."""

from __future__ import annotations

import numpy as np

from liverkd.deploy.backends.base import Runner, RunnerError, default_threads, require
from liverkd.deploy.bundle import ModelFile


class OnnxRuntimeRunner(Runner):
    """One InferenceSession over the verified bytes of an ONNX file."""

    name = "onnxruntime"

    def __init__(self, model: ModelFile, *, providers: list[str] | None = None, threads: int | None = None,
                 spin: bool = False, **common):  # fmt: skip
        """`common`: precision, input_shape (Runner). `threads`: intra-op threads; default
        $LIVERKD_THREADS, else the CPUs of this process's affinity (base.default_threads)."""
        super().__init__(model, **common)
        ort = require(
            "onnxruntime", "pip install 'liverkd[onnxruntime]', or on a Jetson NVIDIA's onnxruntime-gpu wheel"
        )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
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

    def infer_device(self, x):
        """CuPy in, CuPy out with the CUDA provider: IO binding to device pointers, so ONNX Runtime
        reads the window and writes the logits in GPU memory (CPU provider: through the host)."""
        if self.device != "cuda":
            return super().infer_device(x)
        import time

        import cupy

        x = cupy.ascontiguousarray(x, dtype=cupy.float32)
        channels = self.session.get_outputs()[0].shape[1]
        out = cupy.empty((x.shape[0], channels if isinstance(channels, int) else 2, *x.shape[2:]), cupy.float32)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", 0, np.float32, list(x.shape), x.data.ptr)
        binding.bind_output(self.output_name, "cuda", 0, np.float32, list(out.shape), out.data.ptr)
        cupy.cuda.get_current_stream().synchronize()  # the window is written before ONNX Runtime reads it
        t0 = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.last_timings = {"h2d": 0.0, "network": time.perf_counter() - t0, "d2h": 0.0}
        return out

    def close(self) -> None:
        self.session = None
