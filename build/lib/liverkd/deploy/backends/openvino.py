"""OpenVINO on the CPU: runs the ONNX file it is given (an int8 bundle's Q/DQ model runs as int8)."""

from __future__ import annotations

import numpy as np

from liverkd.deploy.backends.base import Runner, RunnerError, default_threads, require
from liverkd.deploy.bundle import ModelFile

PRECISION_NAMES = {"f32": "fp32", "f16": "fp16"}
"""OpenVINO's inference precision names ("f32", "bf16", "f16") -> ours."""


class OpenVINORunner(Runner):
    """An fp32 model is pinned to f32 arithmetic: left alone, OpenVINO runs float models in bf16 on
    CPUs with AMX / AVX512-BF16, and the runner would no longer be what its precision says. Other
    precisions keep OpenVINO's own choice for the layers that are not quantized (bf16 on such CPUs).
    `inference_precision` ("f32", "bf16", "f16") overrides it.
    """

    name = "openvino"

    def __init__(self, model: ModelFile, *, threads: int | None = None, hint: str = "LATENCY",
                 inference_precision: str | None = None, **common):  # fmt: skip
        """`common`: precision, input_shape (Runner)."""
        super().__init__(model, **common)
        ov = require("openvino", "pip install 'liverkd[openvino]'")
        props = require("openvino.properties", "pip install 'liverkd[openvino]'")
        hints = require("openvino.properties.hint", "pip install 'liverkd[openvino]'")
        modes = hints.PerformanceMode.__members__
        if hint not in modes:
            raise RunnerError(f"OpenVINO hint {hint!r}: choose from {', '.join(modes)}")
        config = {hints.performance_mode: modes[hint], props.inference_num_threads: threads or default_threads()}
        arithmetic = inference_precision or ("f32" if self.precision == "fp32" else None)
        if arithmetic:
            config[hints.inference_precision] = arithmetic
        data = model.read()
        try:
            core = ov.Core()
            compiled = core.compile_model(core.read_model(data), "CPU", config)
        except Exception as e:  # OpenVINO's message: "Exception from src/...:N:" lines, then the reason
            why = [line for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from")]
            raise RunnerError(
                f"{model.path}: OpenVINO cannot load it ({why[0] if why else type(e).__name__})"
            ) from None
        partial = compiled.input(0).get_partial_shape()
        self.accept_input_shape([d.get_length() if d.is_static else None for d in partial])
        self.request = compiled.create_infer_request()
        self.precision = PRECISION_NAMES.get(arithmetic, arithmetic) or self.precision

    def _infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True, share_outputs=True)
        return self.request.get_output_tensor(0).data.copy()  # the next call reuses OpenVINO's buffer

    def close(self) -> None:
        self.request = None
