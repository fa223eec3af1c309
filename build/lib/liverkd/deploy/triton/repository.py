"""`liverkd export-triton`: an engine bundle -> a Triton model repository (docs/serving.md).

    model_repository/
      liver_seg/                pre/post-processing, Python backend (seg_model.py)
        config.pbtxt            NIFTI (bytes) in; MASK (mask NIfTI bytes), INFO (JSON) out
        1/model.py              a two-line shim: liverkd.deploy.triton.seg_model
        1/liverkd.json          the bundle's PreprocessSpec, window size, overlap, network names
      liver_net/                the network, called by liver_seg through BLS once per window
        config.pbtxt            ONNX Runtime backend (`--network onnxruntime`) or Python backend
        1/model.onnx            the bundle's ONNX with a dynamic batch axis (max_batch_size > 0)
        1/model.py              `--network python` only: liverkd's ONNX Runtime runner (net_model.py)

BLS, not an ensemble: an ensemble is a fixed graph of one call per model, but a volume larger
than the window takes a variable number of network calls (the sliding window), and the way
back to the input's grid (the Inverse) is Python state that would have to travel as tensors.
One Python model that runs liverkd.core.inference.segment_volume, with `predict` a BLS call,
is the same one inference path as `liverkd infer`, with nothing re-implemented.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liverkd.core.errors import LiverkdError

SEG_MODEL = "liver_seg"
NET_MODEL = "liver_net"
NIFTI_INPUT, MASK_OUTPUT, INFO_OUTPUT = "NIFTI", "MASK", "INFO"
SETTINGS = "liverkd.json"
SETTINGS_FORMAT, SETTINGS_VERSION = "liverkd-triton", 1
NETWORKS = ("onnxruntime", "python")
MAX_BATCH_SIZE = 4
"""Windows per network call at most: 4 x (1 + 2) x 128^3 float32 = 100 MB in flight; enough to fill a GPU
with the windows of concurrent volumes, small enough for any of them."""
SEG_INSTANCES = 2
"""liver_seg processes: one resamples a volume on the CPU while another one's windows are on the network."""
OVERLAP = 0.25
"""The sliding-window overlap of `liverkd infer` (the Segmenter's default; tests/test_triton.py holds them equal)."""
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}

SHIM = '''"""Triton Python backend model {model}: liverkd's {module} (liverkd must be installed
in the Python that runs the backend stub; docs/serving.md)."""

from {module} import TritonPythonModel  # noqa: F401
'''


class TritonExportError(LiverkdError):
    """A repository that cannot be written (a bad bundle, an existing model folder, a missing package)."""


@dataclass
class ExportResult:
    repository: Path
    network: str
    max_batch_size: int
    models: dict[str, Path] = field(default_factory=dict)
    schema_checked: bool = False
    """Every config.pbtxt parsed with Triton's own protobuf schema (tritonclient installed)."""

    def summary(self) -> str:
        batch = f"dynamic batch axis, max_batch_size {self.max_batch_size}" if self.max_batch_size else "batch 1"
        schema = (
            "config.pbtxt checked against Triton's schema (tritonclient)"
            if self.schema_checked
            else "config.pbtxt not checked (tritonclient not installed: pip install 'liverkd[triton]')"
        )
        models = ", ".join(self.models)
        return f"{self.repository}: {models} (network on {self.network} backend, {batch}); {schema}"


# ---------------------------------------------------------------- config.pbtxt


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def seg_config(instances: int = SEG_INSTANCES) -> str:
    return f"""# liverkd pre- and post-processing (liverkd.deploy.triton.seg_model): the NIfTI file's bytes in,
# the mask NIfTI (the input's shape and affine, exactly what `liverkd infer` writes) and a JSON of
# facts (liver mL, warnings, stage timings) out. One request is one whole volume: volumes differ in
# size, so nothing is batched here; the network model batches the windows of concurrent volumes.
name: "{SEG_MODEL}"
backend: "python"
max_batch_size: 0
input [
  {{
    name: "{NIFTI_INPUT}"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
output [
  {{
    name: "{MASK_OUTPUT}"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }},
  {{
    name: "{INFO_OUTPUT}"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
# {instances} processes on the CPU: while one volume is resampled and cleaned (numpy, one core),
# another one's windows are on the network.
instance_group [
  {{
    count: {instances}
    kind: KIND_CPU
  }}
]
"""


def net_config(network: str, input_name: str, output_name: str, input_shape, output_shape, dtype: str,
               max_batch_size: int) -> str:  # fmt: skip
    """liver_net's config. With max_batch_size > 0 the dims leave out the batch axis (Triton's rule)."""
    batched = max_batch_size > 0
    in_dims = _dims(input_shape[1:] if batched else input_shape)
    out_dims = _dims(output_shape[1:] if batched else output_shape)
    if network == "onnxruntime":
        head = 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"'
        # KIND_AUTO: one instance on each GPU where there is one, else one on the CPU (ONNX Runtime
        # then uses every core for one window; a second CPU instance would only split them).
        group = "count: 1\n    kind: KIND_AUTO"
        what = "the bundle's ONNX on Triton's ONNX Runtime backend"
    else:
        head = 'backend: "python"'
        group = "count: 1\n    kind: KIND_CPU"
        what = (
            "the bundle's ONNX on liverkd's own ONNX Runtime runner (liverkd.deploy.triton.net_model), for a\n"
            "# server without the ONNX Runtime backend (pytriton's bundled tritonserver has only the Python one)"
        )
    batching = (
        "# Windows of concurrent volumes are batched as they queue, with no added wait (a real-time\n"
        "# server: a lone volume is never held back for company).\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}\n"
        if batched
        else "# batch 1: the ONNX's batch axis is fixed (export with --max-batch-size 0)\n"
    )
    return f"""# liverkd network: {what}.
name: "{NET_MODEL}"
{head}
max_batch_size: {max_batch_size}
input [
  {{
    name: "{input_name}"
    data_type: {_TRITON_TYPES[dtype]}
    dims: {in_dims}
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: {_TRITON_TYPES[dtype]}
    dims: {out_dims}
  }}
]
{batching}instance_group [
  {{
    {group}
  }}
]
"""


def parse_config(text: str):
    """`text` parsed with Triton's own protobuf schema (tritonclient's model_config_pb2) -> ModelConfig;
    google.protobuf.text_format.ParseError on anything Triton would not read."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _schema_available() -> bool:
    try:
        import google.protobuf.text_format  # noqa: F401
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except Exception:  # ImportError, or tritonclient.grpc's RuntimeError without grpcio
        return False
    return True


# ---------------------------------------------------------------- the network with a batch axis


def dynamic_batch_onnx(data: bytes, input_name: str, output_name: str) -> bytes:
    """The ONNX model `data` with its batch axis (the first of the named input and output) made
    dynamic ("batch"), by editing the graph's declared shapes alone (the onnx package, no torch).

    Valid for a network whose nodes never hard-code the batch size (convolutions, pooling,
    concatenation over channels: the liverkd U-Nets); a Reshape or Expand is refused, and
    check_batch runs the edited model against the original to prove the edit changed nothing."""
    from liverkd.extras import require

    onnx = require("onnx", "export-triton with a dynamic batch axis (or --max-batch-size 0)")
    model = onnx.load_from_string(data)
    shape_ops = sorted({n.op_type for n in model.graph.node} & {"Reshape", "Expand", "Tile", "Shape", "Flatten"})
    if shape_ops:
        raise TritonExportError(f"the network has {', '.join(shape_ops)} nodes: its batch axis cannot be made "
                                "dynamic by editing shapes alone; export with --max-batch-size 0")  # fmt: skip
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if node.op_type == "Concat" and axis == 0:
            raise TritonExportError("the network concatenates over the batch axis; export with --max-batch-size 0")
    ends = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for name in (input_name, output_name):
        if name not in ends:
            raise TritonExportError(f"the ONNX has no graph input or output named {name!r} (engine.json says so)")
        dim = ends[name].type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    del model.graph.value_info[:]  # inner shapes recorded for batch 1; ONNX Runtime infers them again
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_batch(original: bytes, batched: bytes, input_shape, *, seed: int = 0) -> None:
    """ONNX Runtime: the batched model on two windows gives, for each, what the original gives on
    it alone (to float rounding; at batch 1 bit for bit). TritonExportError otherwise."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    rng = np.random.default_rng(seed)
    x = rng.random((2, *input_shape[1:]), dtype=np.float32)
    a = ort.InferenceSession(original, sess_options=opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(batched, sess_options=opts, providers=["CPUExecutionProvider"])
    name = a.get_inputs()[0].name
    single = [a.run(None, {name: x[i : i + 1]})[0] for i in range(2)]
    if not np.array_equal(b.run(None, {name: x[:1]})[0], single[0]):
        raise TritonExportError("the network with a dynamic batch axis differs from the bundle's at batch 1")
    both = b.run(None, {name: x})[0]
    for i in range(2):
        if not np.allclose(both[i : i + 1], single[i], rtol=1e-4, atol=1e-5):
            raise TritonExportError("the network with a dynamic batch axis gives other logits at batch 2")


# ---------------------------------------------------------------- the repository


def export_repository(
    bundle,
    out,
    *,
    network: str = "onnxruntime",
    max_batch_size: int = MAX_BATCH_SIZE,
    instances: int = SEG_INSTANCES,
    overwrite: bool = False,
    check: bool = True,
) -> ExportResult:
    """Write liver_seg/ and liver_net/ for `bundle` (a Bundle or its folder) into the repository `out`
    (created if missing; other models in it are left alone). An existing liver_seg/ or liver_net/ is
    replaced only with `overwrite`. `check`: prove the batch-axis edit on ONNX Runtime (check_batch)."""
    from liverkd import __version__
    from liverkd.deploy.bundle import Bundle

    if network not in NETWORKS:
        raise TritonExportError(f"--network {network!r}: choose from {', '.join(NETWORKS)}")
    if not 0 <= max_batch_size <= 64:
        raise TritonExportError(f"--max-batch-size {max_batch_size}: give 0 (batch 1) to 64")
    if instances < 1:
        raise TritonExportError(f"--instances {instances}: give 1 or more")
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    meta = bundle.meta
    for tensor in (meta.input, meta.output):
        if tensor.dtype not in _TRITON_TYPES:
            raise TritonExportError(f"{bundle.path}: {tensor.name} is {tensor.dtype}; Triton export takes float32")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TritonExportError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    existing = [out / name for name in (SEG_MODEL, NET_MODEL) if (out / name).exists()]
    if existing and not overwrite:
        raise TritonExportError(f"{existing[0]}: exists; not replaced (--overwrite replaces it)")

    onnx_bytes = bundle.model_for("onnxruntime").read()  # verified against engine.json's sha256
    if max_batch_size:
        net_bytes = dynamic_batch_onnx(onnx_bytes, meta.input.name, meta.output.name)
        if check:
            check_batch(onnx_bytes, net_bytes, meta.input.shape)
    else:
        net_bytes = onnx_bytes
    shape = meta.input.shape[-3:]
    roi = list(shape) if all(isinstance(s, int) for s in shape) else list(bundle.spec.input_shape)
    settings = {
        "format": SETTINGS_FORMAT,
        "version": SETTINGS_VERSION,
        "liverkd": __version__,
        "bundle": bundle.name,
        "precision": bundle.precision,
        "spec": bundle.spec.to_dict(),
        "roi_size": roi,
        "overlap": OVERLAP,
        "liver_label": int(bundle.spec.labels.get("liver", 1)),
        "network": {"model": NET_MODEL, "input": meta.input.name, "output": meta.output.name},
    }
    configs = {
        SEG_MODEL: seg_config(instances),
        NET_MODEL: net_config(
            network,
            meta.input.name,
            meta.output.name,
            meta.input.shape,
            meta.output.shape,
            meta.input.dtype,
            max_batch_size,
        ),  # fmt: skip
    }
    files = {
        SEG_MODEL: {
            "model.py": SHIM.format(model=SEG_MODEL, module="liverkd.deploy.triton.seg_model"),
            SETTINGS: json.dumps(settings, indent=2) + "\n",
        },  # fmt: skip
        NET_MODEL: {"model.onnx": net_bytes},
    }
    if network == "python":
        files[NET_MODEL]["model.py"] = SHIM.format(model=NET_MODEL, module="liverkd.deploy.triton.net_model")
    schema_checked = check and _schema_available()
    if schema_checked:
        for name, text in configs.items():
            try:
                parse_config(text)
            except Exception as e:  # text_format.ParseError: a bug here, never the user's
                raise TritonExportError(f"{name}/config.pbtxt does not parse with Triton's schema: {e}") from None

    result = ExportResult(out, network, max_batch_size, schema_checked=schema_checked)
    for name in (SEG_MODEL, NET_MODEL):
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        try:
            (staging / "config.pbtxt").write_text(configs[name])
            (staging / "1").mkdir()
            for filename, content in files[name].items():
                target = staging / "1" / filename
                target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
            _replace(staging, out / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        result.models[name] = out / name
    return result


def _replace(staging: Path, target: Path) -> None:
    """Move the finished `staging` folder to `target`, the old `target` (if any) out of the way first."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.chmod(0o755)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_settings(folder) -> dict:
    """liver_seg's liverkd.json (`folder`: the model's version folder), checked."""
    path = Path(folder) / SETTINGS
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TritonExportError(f"{path}: unreadable ({e})") from None
    if settings.get("format") != SETTINGS_FORMAT or settings.get("version") != SETTINGS_VERSION:
        raise TritonExportError(f"{path}: not a liverkd-triton settings file of version {SETTINGS_VERSION}")
    return settings
