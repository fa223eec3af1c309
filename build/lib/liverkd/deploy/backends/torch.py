"""PyTorch: the bundle's source checkpoint (model.pt) run eagerly, for parity checks and GPU
timing where TensorRT is absent. It loads the network through deploy.export, the one place
in deploy/ that may import the training code; the checkpoint's bytes are checked against
engine.json first and unpickled with torch.load(weights_only=True) (docs/security.md)."""

from __future__ import annotations

import time

import numpy as np

from liverkd.deploy.backends.base import Runner, RunnerError, require
from liverkd.deploy.bundle import ModelFile


class TorchRunner(Runner):
    """CUDA when available (fp16 by `half=True` or an fp16 precision), else CPU fp32."""

    name = "torch"

    def __init__(self, checkpoint: ModelFile, *, device: str | None = None, half: bool | None = None, **common):
        """`common`: precision, input_shape (Runner)."""
        super().__init__(checkpoint, **common)
        torch = require("torch", "pip install 'liverkd[train]' (torch==2.13.0 for the CPU build)")
        from liverkd.deploy.export import ExportError, load_torch_model

        data = checkpoint.read()
        try:
            model, _spec, _payload = load_torch_model(checkpoint.path, data=data)
        except (ExportError, ValueError) as e:
            raise RunnerError(str(e)) from None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RunnerError("torch backend asked for CUDA, but torch sees no GPU")
        half = half if half is not None else (self.precision == "fp16" and device.startswith("cuda"))
        self.torch = torch
        self.dtype = torch.float16 if half else torch.float32
        # channels-last 3-D: measured 2.4x (30k) and 3.2x (100k) faster fp32 on an H200 (docs/results.md)
        self.memory_format = torch.channels_last_3d if device.startswith("cuda") else torch.contiguous_format
        self.network = model.to(device=device, dtype=self.dtype, memory_format=self.memory_format).eval()
        self.device = device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
        self.cuda = device.startswith("cuda")
        self.precision = "fp16" if half else "fp32"
        if self.expected_input_shape is not None:  # a fully convolutional net declares none: take engine.json's
            self.accept_input_shape(self.expected_input_shape)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        dev = next(self.network.parameters()).device
        host = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.inference_mode():
            if not self.cuda:
                t0 = time.perf_counter()
                out = self.network(host.to(self.dtype)).float().numpy()
                self.last_timings = {"h2d": 0.0, "network": time.perf_counter() - t0, "d2h": 0.0}
                return out
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
            xd = host.to(dev, non_blocking=False).to(self.dtype).contiguous(memory_format=self.memory_format)
            events[1].record()
            yd = self.network(xd)
            events[2].record()
            out = yd.float().cpu().numpy()
            events[3].record()
            events[3].synchronize()
        ms = [events[i].elapsed_time(events[i + 1]) for i in range(3)]
        self.last_timings = {"h2d": ms[0] / 1e3, "network": ms[1] / 1e3, "d2h": ms[2] / 1e3}
        return out

    def infer_device(self, x):
        """CuPy in, CuPy out, through DLPack: no copy to or from the host (CUDA only)."""
        if not self.cuda:
            return super().infer_device(x)
        import cupy

        torch = self.torch
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        with torch.inference_mode():
            xd = torch.from_dlpack(x).to(self.dtype).contiguous(memory_format=self.memory_format)
            events[0].record()
            yd = self.network(xd)
            events[1].record()
            out = yd.float().contiguous()
        events[1].synchronize()
        self.last_timings = {"h2d": 0.0, "network": events[0].elapsed_time(events[1]) / 1e3, "d2h": 0.0}
        return cupy.from_dlpack(out)

    def close(self) -> None:
        self.network = None
