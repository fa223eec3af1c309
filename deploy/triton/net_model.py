"""liver_net as a Python-backend model, for a server without Triton's ONNX Runtime backend
(pytriton's bundled tritonserver ships only the Python backend): the network runs on liverkd's
own ONNX Runtime runner, with the session options `liverkd infer` uses, so its logits are the
ones `liverkd infer` gets. `export-triton --network python` writes it.

Dynamic batching hands `execute` the windows of several concurrent volumes at once: they run
as one batch and each request gets its own slice back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from liverkd.deploy.triton.seg_model import pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from liverkd.deploy.backends.onnxruntime import OnnxRuntimeRunner
        from liverkd.deploy.bundle import ModelFile

        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        folder = Path(args["model_repository"]) / args["model_version"]
        self.runner = OnnxRuntimeRunner(ModelFile.of(folder / "model.onnx"))

    def execute(self, requests):
        pb = pb_utils()
        windows = [pb.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            logits = self.runner.infer(windows[0] if len(windows) == 1 else np.concatenate(windows))
        except Exception as e:  # a wrong shape (RunnerError) or ONNX Runtime's own: every request is told
            return [pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))) for _ in requests]
        responses, start = [], 0
        for window in windows:
            part = np.ascontiguousarray(logits[start : start + len(window)])
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(self.output_name, part)]))
            start += len(window)
        return responses

    def finalize(self):
        self.runner.close()
