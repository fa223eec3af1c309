"""`liverkd triton-infer`: a NIfTI file to a Triton server running the export-triton repository,
the mask back to a file (tritonclient's HTTP client; `pip install 'liverkd[triton]'`).

What travels is the file as it is on disk (.nii or .nii.gz bytes; a CT compresses 2-4x, so
this is less than its voxels), and what comes back is the mask file `liverkd infer` would have
written for it, made on the server by the same functions: same shape, affine, qform/sform
codes and voxels. The client parses neither; it checks the output path as `liverkd infer` does
(never an input, an existing file only with --overwrite) and writes atomically.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from liverkd.core.atomic import atomic_path
from liverkd.core.errors import LiverkdError
from liverkd.deploy.triton.repository import INFO_OUTPUT, MASK_OUTPUT, NIFTI_INPUT, SEG_MODEL

DEFAULT_URL = "localhost:8000"
TIMEOUT_S = 600.0
"""A whole volume's round trip at most (a 512^2 x 900 CT on a small CPU takes tens of seconds)."""


class TritonClientError(LiverkdError):
    """The server cannot be reached, or refused the volume (one line, naming the file)."""


def _http():
    try:
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException
    except ImportError as e:
        from liverkd.extras import MissingExtra

        raise MissingExtra(f"liverkd triton-infer needs tritonclient: pip install 'liverkd[triton]' ({e})") from None
    return http, InferenceServerException


class TritonSegmenter:
    """One HTTP connection to a server; `segment_file` per volume. Not thread-safe (tritonclient's
    HTTP client is not): one per thread."""

    def __init__(self, url: str = DEFAULT_URL, model: str = SEG_MODEL, *, timeout: float = TIMEOUT_S):
        self.http, self._error = _http()
        self.url, self.model = url, model
        self.client = self.http.InferenceServerClient(url=url, connection_timeout=timeout, network_timeout=timeout)

    def segment_bytes(self, data: bytes, name: str = "<bytes>") -> tuple[bytes, dict]:
        """NIfTI file bytes -> (mask .nii.gz bytes, facts: liver_ml, warnings, timings, ...)."""
        tensor = self.http.InferInput(NIFTI_INPUT, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
        wanted = [self.http.InferRequestedOutput(n, binary_data=True) for n in (MASK_OUTPUT, INFO_OUTPUT)]
        try:
            result = self.client.infer(self.model, inputs=[tensor], outputs=wanted)
        except self._error as e:
            raise TritonClientError(name, f"{self.url} ({self.model}): {e.message()}") from None
        except OSError as e:  # refused, reset, timed out
            raise TritonClientError(name, f"cannot reach Triton at {self.url}: {e.strerror or e}") from None
        mask = result.as_numpy(MASK_OUTPUT).reshape(-1)[0]
        facts = json.loads(result.as_numpy(INFO_OUTPUT).reshape(-1)[0])
        return bytes(mask), facts

    def segment_file(self, in_path, out_path=None, *, overwrite: bool = False) -> dict:
        """Segment one NIfTI file on the server; write the mask to `out_path` (default: `<input>_liver.nii.gz`
        beside it). A `.nii` output is written uncompressed. Returns the facts, with "input" and "output"."""
        from liverkd.deploy.segment import check_output, output_path_for

        in_path = Path(in_path)
        if in_path.is_dir():
            raise TritonClientError(in_path, "a folder: triton-infer sends NIfTI files (`liverkd infer` reads DICOM)")
        out_path = Path(out_path) if out_path is not None else output_path_for(in_path)
        check_output(out_path, in_path, overwrite=overwrite)
        try:
            data = in_path.read_bytes()
        except OSError as e:
            raise TritonClientError(in_path, f"cannot read it ({e.strerror or e})") from None
        mask, facts = self.segment_bytes(data, str(in_path))
        if not out_path.name.lower().endswith(".gz"):
            mask = gzip.decompress(mask)
        check_output(out_path, in_path, overwrite=overwrite)  # again: a file may have appeared meanwhile
        with atomic_path(out_path, suffix=".nii.gz" if out_path.name.lower().endswith(".gz") else ".nii") as tmp:
            tmp.write_bytes(mask)
        return {"input": str(in_path), "output": str(out_path), **facts}

    def ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model))
        except Exception:
            return False

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
