"""liver_seg: the pre- and post-processing as a Triton Python-backend model.

One request = one volume: the bytes of a NIfTI file (.nii or .nii.gz) in; out, the bytes of the
mask NIfTI that `liverkd infer` would write for that file (uint8, the input's shape, affine and
qform/sform codes) and a JSON of facts. Between the two, exactly `liverkd infer`'s way:

    V.load (every check of a bad input) -> liverkd.core.inference.segment_volume (prepare,
    segment_grid with the sliding window, the Inverse, threshold) -> mask_image -> V.save

with `predict` a BLS request to liver_net for each window. The file is read from and written to a
private temporary folder, so reading and writing are the very functions `liverkd infer` calls.
"""

from __future__ import annotations

import importlib
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from liverkd.core import volume as V
from liverkd.core.errors import LiverkdError
from liverkd.core.inference import segment_volume
from liverkd.core.spec import PreprocessSpec
from liverkd.core.timing import Clock
from liverkd.deploy.triton.repository import INFO_OUTPUT, MASK_OUTPUT, NIFTI_INPUT, load_settings

EMPTY_MASK = "no liver found: the mask is empty"


def pb_utils():
    """Triton's triton_python_backend_utils: only inside the backend stub (tests put a stand-in in sys.modules)."""
    return importlib.import_module("triton_python_backend_utils")


def nifti_suffix(data: bytes) -> str:
    """The file name ending V.load reads `data` by: gzip or bzip2 by their magic bytes, else plain .nii."""
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if data[:3] == b"BZh":
        return ".nii.bz2"
    return ".nii"


class Pipeline:
    """NIfTI bytes -> (mask NIfTI bytes, facts), `predict` running the network on each window."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.spec = PreprocessSpec.from_dict(settings["spec"])
        self.roi_size = tuple(int(n) for n in settings["roi_size"])
        self.overlap = float(settings["overlap"])
        self.label = int(settings["liver_label"])

    def __call__(self, data: bytes, predict) -> tuple[bytes, dict]:
        from liverkd.deploy.segment import mask_image  # the header rules of `liverkd infer`'s masks

        clock = Clock()

        def timed(x):
            """`predict`, its seconds as "network" (as a Runner's: segment_grid leaves them out of postprocess)."""
            t0 = time.perf_counter()
            out = predict(x)
            clock.add("network", time.perf_counter() - t0)
            return out

        with tempfile.TemporaryDirectory(prefix="liverkd-triton-") as tmp:
            source = Path(tmp) / f"volume{nifti_suffix(data)}"
            source.write_bytes(data)
            try:
                with warnings.catch_warnings():  # they travel back in the facts, not to the server log
                    warnings.simplefilter("ignore", V.VolumeWarning)
                    with clock.stage("read"):
                        vol = V.load(source, grid_spacing=self.spec.spacing)
                mask = segment_volume(vol, self.spec, timed, roi_size=self.roi_size, overlap=self.overlap,
                                      label=self.label, clock=clock)  # fmt: skip
                with clock.stage("write"):
                    encoded = V.save(mask_image(mask, vol), Path(tmp) / "mask.nii.gz").read_bytes()
            except LiverkdError as e:  # named after the temporary file: the client names its own
                raise LiverkdError(e.problem if e.path == str(source) else str(e)) from None
        voxels = int(np.count_nonzero(mask))
        notes = [*vol.warnings, *([] if voxels else [EMPTY_MASK])]
        facts = {
            "liver_ml": voxels * float(np.prod(vol.spacing)) / 1000.0,
            "liver_voxels": voxels,
            "shape": list(vol.shape),
            "warnings": notes,
            "engine": f"{self.settings['bundle']} ({self.settings['precision']}) on Triton",
            "timings": {k: round(v, 6) for k, v in clock.timings().items()},
        }
        return encoded, facts


class TritonPythonModel:
    """Triton's entry points (initialize, execute, finalize) around Pipeline."""

    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        settings = load_settings(folder)
        self.pipeline = Pipeline(settings)
        network = settings["network"]
        self.net_model, self.net_input, self.net_output = network["model"], network["input"], network["output"]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """One window through liver_net (BLS): float32 (1, 1, X, Y, Z) -> logits (1, C, X, Y, Z)."""
        pb = pb_utils()
        request = pb.InferenceRequest(
            model_name=self.net_model,
            requested_output_names=[self.net_output],
            inputs=[pb.Tensor(self.net_input, np.ascontiguousarray(x, dtype=np.float32))],
            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0),  # logits in host memory
        )
        response = request.exec()
        if response.has_error():
            raise pb.TritonModelException(f"{self.net_model}: {response.error().message()}")
        return pb.get_output_tensor_by_name(response, self.net_output).as_numpy()

    def execute(self, requests):
        pb = pb_utils()
        responses = []
        for request in requests:
            try:
                tensor = pb.get_input_tensor_by_name(request, NIFTI_INPUT)
                data = tensor.as_numpy().reshape(-1) if tensor is not None else ()
                if len(data) != 1 or not isinstance(data[0], bytes) or not data[0]:
                    raise LiverkdError(f"{NIFTI_INPUT}: send one NIfTI file's bytes")
                mask, facts = self.pipeline(data[0], self.predict)
                outputs = [
                    pb.Tensor(MASK_OUTPUT, np.array([mask], dtype=np.object_)),
                    pb.Tensor(INFO_OUTPUT, np.array([json.dumps(facts).encode()], dtype=np.object_)),
                ]
                responses.append(pb.InferenceResponse(output_tensors=outputs))
            except LiverkdError as e:  # a bad volume: the client gets the one line
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))))
        return responses

    def finalize(self):
        self.pipeline = None
