from __future__ import annotations

import os

import numpy as np
from liverkd.deploy.backends.base import Runner, RunnerError


class OpenVINORunner(Runner):
    """OpenVINO on the CPU: runs bundle.onnx_for_runtime (an int8 bundle's Q/DQ model runs as int8).

    An fp32 bundle is pinned to f32 arithmetic: left alone, OpenVINO runs float models in bf16 on
    CPUs with AMX / AVX512-BF16, and the bundle would no longer be what its precision says. Other
    precisions keep OpenVINO's own choice for the layers that are not quantized (bf16 on such CPUs).
    `inference_precision` ("f32", "bf16", "f16") overrides it.
    """

    name = "openvino"

    def __init__(self, threads: int | None = None, hint: str = "LATENCY", inference_precision: str | None = None):
        super().__init__()
        self.threads = threads
        self.hint = hint
        self.inference_precision = inference_precision
        self.request = None

    def load(self, bundle) -> OpenVINORunner:
        try:
            import openvino as ov
            import openvino.properties as props
            import openvino.properties.hint as hints
        except ImportError:
            raise RunnerError("openvino is not installed (pip install 'liverkd[openvino]')") from None
        modes = hints.PerformanceMode.__members__
        if self.hint not in modes:
            raise RunnerError(f"OpenVINO hint {self.hint!r}: choose from {', '.join(modes)}")
        path = bundle.onnx_for_runtime
        config = {
            hints.performance_mode: modes[self.hint],
            props.inference_num_threads: self.threads or (os.cpu_count() or 1),
        }
        precision = self.inference_precision or ("f32" if bundle.precision == "fp32" else None)
        if precision:
            config[hints.inference_precision] = precision  # OpenVINO names: "f32", "bf16", "f16"
        try:
            core = ov.Core()
            compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as e:  # OpenVINO's message: "Exception from src/...:N:" lines, then the reason
            why = [line for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from")]
            raise RunnerError(f"{path}: OpenVINO cannot load it ({why[0] if why else type(e).__name__})") from None
        self.request = compiled.create_infer_request()
        self.device = "cpu"
        self.precision = {"f32": "fp32", "f16": "fp16"}.get(precision, precision) or bundle.precision
        return self

    def _infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True, share_outputs=True)
        return self.request.get_output_tensor(0).data.copy()  # the next call reuses OpenVINO's buffer

    def close(self) -> None:
        self.request = None
