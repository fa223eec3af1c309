"""Checkpoint or ONNX -> engine bundle (engines/NAME: ONNX files, optional TensorRT plan, engine.json).

Everything is built in a temp folder beside the target and renamed into place at the end:
a failed export, calibration, TensorRT build or accuracy gate leaves no bundle behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from liverkd.core.atomic import fsync_dir, sha256_file
from liverkd.core.errors import LiverkdError
from liverkd.core.spec import PreprocessSpec
from liverkd.deploy import calibrate as C
from liverkd.deploy.backends.base import RunnerError, open_runner
from liverkd.deploy.bundle import (
    PRECISIONS,
    AccuracyCheck,
    Bundle,
    BundleError,
    Calibration,
    EngineMeta,
    FileRecord,
    ModelFile,
    Source,
    SpeedCheck,
    TensorInfo,
)
from liverkd.deploy.compare import compare, run
from liverkd.deploy.fp16 import to_fp16

BUILD_BACKENDS = ("auto", "tensorrt", "onnxruntime")
GATE_PHANTOM_SEEDS = (9001, 9002)
"""Phantoms for the accuracy gate when no calibration volume is held out (never used to calibrate)."""
DEFAULT_CALIB_DATA = Path("calib_data")
"""Where int8 builds look for calibration volumes when --calib-data is not given."""
TIMED_RUNS = 3
SLOWER_THAN_FP32 = 1.10
"""Warn when the built model's median latency exceeds fp32's by more than this factor."""


class BuildError(LiverkdError, ValueError):
    """The bundle cannot be built. str() is one line naming the file or option."""


def choose_backend(requested: str, cuda_binding: str = "auto") -> tuple[str, str]:
    """(backend, why in a few words). auto = TensorRT when it, a CUDA binding and a GPU are present."""
    from liverkd.deploy.backends.tensorrt import target_here, tensorrt_available

    if requested == "onnxruntime":
        return "onnxruntime", "asked for with --backend onnxruntime"
    ok, why = tensorrt_available(cuda_binding)
    if ok:
        here = target_here(cuda_binding)
        return "tensorrt", f"TensorRT {here.version} and {here.gpu_name} found"
    if requested == "tensorrt":
        raise BuildError(f"--backend tensorrt: {why}")
    return "onnxruntime", f"no TensorRT build here: {why}"


def build_engine(
    source,
    out,
    precision: str = "fp32",
    *,
    calib_data=None,
    calib_method: str = "minmax",
    backend: str = "auto",
    workspace_mib: int = 1024,
    min_agreement: float = 0.995,
    cuda_binding: str = "auto",
    log: Callable[[str], None] = print,
) -> Bundle:
    """Build the bundle at `out`; returns it loaded. Raises BuildError (nothing written) on failure."""
    source, out = Path(source), Path(out)
    if precision not in PRECISIONS:
        raise BuildError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if backend not in BUILD_BACKENDS:
        raise BuildError(f"--backend {backend!r}: choose from {', '.join(BUILD_BACKENDS)}")
    if calib_method not in C.METHODS:
        raise BuildError(f"--calib-method {calib_method!r}: choose from {', '.join(C.METHODS)}")
    if not 0.0 < min_agreement <= 1.0:
        raise BuildError(f"--min-agreement {min_agreement}: must be in (0, 1]")
    if not source.is_file():
        raise BuildError(f"{source}: no such checkpoint or ONNX file")
    if out.exists() and not (out / "engine.json").is_file():
        raise BuildError(f"{out}: exists and is not an engine bundle; choose another --out")
    calib_files: list[Path] = []
    if precision == "int8":
        if calib_data is None:
            if not DEFAULT_CALIB_DATA.is_dir():
                raise BuildError(
                    f"--precision int8 needs --calib-data DIR or volumes in ./{DEFAULT_CALIB_DATA} "
                    f"(`liverkd data synth --out {DEFAULT_CALIB_DATA}` makes some)"
                )
            calib_data = DEFAULT_CALIB_DATA
        calib_files = C.calibration_files(calib_data)
    backend, why = choose_backend(backend, cuda_binding)
    log(f"backend: {backend} ({why})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    try:
        _build_into(
            tmp,
            out,
            source,
            precision,
            backend,
            calib_files,
            calib_data,
            calib_method,
            workspace_mib,
            min_agreement,
            cuda_binding,
            log,
        )
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(out)


def _build_into(
    tmp: Path,
    out: Path,
    source: Path,
    precision: str,
    backend: str,
    calib_files: list[Path] | None,
    calib_data,
    calib_method: str,
    workspace_mib: int,
    min_agreement: float,
    cuda_binding: str,
    log: Callable[[str], None],
) -> None:
    """Every file into `tmp`, then the accuracy gate, then engine.json: written last, only when the gate passed."""
    files = {"onnx": "model.onnx"}
    if source.suffix == ".onnx":
        spec, src = _take_onnx(source, tmp / "model.onnx")
    else:
        from liverkd.deploy.export import export_onnx

        result = export_onnx(source, tmp / "model.onnx")
        log(f"exported model.onnx: {result.summary().split(': ', 1)[1]}")
        shutil.copyfile(source, tmp / "model.pt")
        files["checkpoint"] = "model.pt"
        spec = result.spec
        src = Source(checkpoint=source.name, sha256=result.source_sha256, preset=result.preset)
    model_input, model_output = _io_of(tmp / "model.onnx")

    calibration = None
    gate_files: list[Path] = []
    if precision == "fp16":
        to_fp16(tmp / "model.onnx", tmp / "model.fp16.onnx")
        files["onnx_fp16"] = "model.fp16.onnx"
    elif precision == "int8":
        used, gate_files = C.split_held_out(calib_files)
        log(f"calibrating ({calib_method}) on {len(used)} volume(s) from {calib_data}; {len(gate_files)} held out")
        entry = C.calibrate(
            tmp / "model.onnx", tmp / "model.int8.onnx", used, spec, calib_method, tmp / "calibration.json"
        )
        C.write_data_loader(tmp / "calib_loader.py", used, spec, model_input.name)
        calibration = Calibration(
            method=entry["method"],
            files=tuple(entry["files"]),
            n=int(entry["n"]),
            statistics=entry["statistics"],
            folder=str(calib_data),
            held_out=tuple(f.name for f in gate_files),
        )
        files.update(onnx_int8="model.int8.onnx", calibration="calibration.json", data_loader="calib_loader.py")

    tensorrt = None
    if backend == "tensorrt":
        from liverkd.deploy.backends.tensorrt import build_plan

        plan_source = _plan_source(files, precision)
        log(f"building TensorRT plan from {plan_source} ({precision}, workspace {workspace_mib} MiB)")
        try:
            tensorrt = build_plan(
                tmp / plan_source,
                tmp / "model.plan",
                precision,
                workspace_mib=workspace_mib,
                timing_cache_dir=out.parent,
            )
        except RunnerError as e:
            raise BuildError(str(e)) from None
        files["plan"] = "model.plan"

    meta = EngineMeta(
        name=out.name,
        spec=spec,
        precision=precision,
        backend=backend,
        input=model_input,
        output=model_output,
        files={role: FileRecord.of(tmp, name) for role, name in files.items()},
        source=src,
        calibration=calibration,
        tensorrt=tensorrt,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    gate_inputs, gate_names = _gate_inputs(gate_files, spec)
    fp32_plan = contextlib.nullcontext()
    if backend == "tensorrt" and precision != "fp32":  # the speed check's fp32, on the same GPU
        fp32_plan = _fp32_plan_runner(
            tmp / "model.onnx", model_input.shape, workspace_mib, out.parent, cuda_binding, log
        )
    with fp32_plan as fp32_same_backend:
        accuracy, speed = accuracy_gate(
            Bundle(tmp, meta), backend, gate_inputs, gate_names, min_agreement, fp32_same_backend, cuda_binding
        )
    log(
        f"accuracy gate: Dice vs fp32 min {accuracy.dice_min:.4f} (mean {accuracy.dice_mean:.4f}) on "
        f"{len(gate_names)} volume(s), argmax agreement {accuracy.argmax_agreement:.4%}, "
        f"max |logit error| {accuracy.max_abs_logit_error:.3g}"
    )
    if precision != "fp32" or backend != "onnxruntime":
        log(
            f"speed: {precision} {speed.built_ms:.1f} ms vs fp32 {speed.fp32_ms:.1f} ms per volume "
            f"on {speed.device} (median of {speed.runs})"
        )
    if not accuracy.passed:
        raise BuildError(
            f"{out}: accuracy gate failed: Dice vs fp32 {accuracy.dice_min:.4f} < --min-agreement "
            f"{min_agreement}; no bundle written"
        )
    if precision != "fp32" and speed.ratio > SLOWER_THAN_FP32:
        log(
            f"WARNING: {precision} on {speed.device} measured {speed.ratio:.1f}x slower than fp32 here "
            f"({speed.built_ms:.1f} vs {speed.fp32_ms:.1f} ms); fp32 is the faster choice on this backend"
        )
    Bundle(tmp, meta.replace(accuracy=accuracy, speed=speed)).save()


def _take_onnx(source: Path, dest: Path) -> tuple[PreprocessSpec, Source]:
    """An exported ONNX (liverkd export): its spec and source facts from the metadata."""
    import onnx

    from liverkd.deploy import export as E

    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise BuildError(f"{source}: not a readable ONNX file ({str(e).splitlines()[0] if str(e) else e})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if E.META_SPEC not in props:
        raise BuildError(f"{source}: no PreprocessSpec in the ONNX metadata (export it with `liverkd export`)")
    spec = PreprocessSpec.from_json(props[E.META_SPEC])
    shutil.copyfile(source, dest)
    src = Source(
        checkpoint=props.get(E.META_SOURCE) or None,
        sha256=props.get(E.META_SHA256) or None,
        preset=props.get(E.META_PRESET) or None,
        onnx=source.name,
        onnx_sha256=sha256_file(source),
    )
    return spec, src


def _io_of(onnx_path: Path) -> tuple[TensorInfo, TensorInfo]:
    """The model's input and output as engine.json records them; a model not shaped (1, C, X, Y, Z) is refused."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def describe(v) -> TensorInfo:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        try:
            return TensorInfo(v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)
        except ValueError as e:
            raise BuildError(f"{onnx_path}: {v.name!r} {e}") from None

    return describe(graph.input[0]), describe(graph.output[0])


def _plan_source(files: dict, precision: str) -> str:
    """The ONNX file TensorRT builds from: precision in the file on TRT >= 10 (strongly typed)."""
    from liverkd.deploy.backends.tensorrt import import_tensorrt, plan_onnx_role

    return files[plan_onnx_role(precision, import_tensorrt().__version__)]


@contextlib.contextmanager
def _fp32_plan_runner(onnx_path, input_shape, workspace_mib, cache_dir, cuda_binding, log):
    """A TensorRT fp32 plan of `onnx_path` (built in a temp folder, never part of the bundle), opened: the speed
    check's fp32 for a TensorRT fp16/int8 bundle, so "slower than fp32" compares two plans on one GPU."""
    from liverkd.deploy.backends.tensorrt import TensorRTRunner, build_plan

    log("building an fp32 TensorRT plan for the speed check (not kept)")
    with tempfile.TemporaryDirectory(prefix="liverkd-fp32-plan-") as work:
        plan = Path(work) / "fp32.plan"
        try:
            target = build_plan(onnx_path, plan, "fp32", workspace_mib=workspace_mib, timing_cache_dir=cache_dir)
            runner = TensorRTRunner(
                ModelFile.of(plan),
                precision="fp32",
                input_shape=input_shape,
                built_for=target,
                cuda_binding=cuda_binding,
            )
        except RunnerError as e:
            raise BuildError(f"{onnx_path}: the fp32 plan for the speed check failed ({e})") from None
        with runner:
            yield runner


def _gate_inputs(held_out: list[Path], spec: PreprocessSpec) -> tuple[list[np.ndarray], list[str]]:
    if held_out:
        return C.load_inputs(held_out, spec), [f.name for f in held_out]
    return [C.phantom_input(spec, s) for s in GATE_PHANTOM_SEEDS], [f"phantom seed {s}" for s in GATE_PHANTOM_SEEDS]


def accuracy_gate(
    bundle: Bundle, backend: str, inputs, names, min_agreement: float, fp32_same_backend=None, cuda_binding="auto"
):
    """(AccuracyCheck, SpeedCheck). Accuracy: the built model against the fp32 model.onnx on ONNX Runtime
    CPU, on held-out inputs (deploy.compare): Dice of the liver masks, argmax agreement, max logit error.
    Speed: the built model's median latency against fp32 on the SAME backend and device (the speed
    warning's evidence): ONNX Runtime CPU's fp32 for an onnxruntime bundle, `fp32_same_backend` (a
    TensorRT fp32 plan) for a TensorRT fp16/int8 bundle, the plan itself for a TensorRT fp32 one.
    Every runner is timed interleaved, call by call."""
    liver = int(bundle.spec.labels.get("liver", 1))
    same_model = bundle.precision == "fp32" and backend == "onnxruntime"  # the reference itself: run it once
    if backend != "onnxruntime" and bundle.precision != "fp32" and fp32_same_backend is None:
        raise BuildError(f"{bundle.path}: the speed check needs an fp32 runner on {backend} (fp32_same_backend)")
    options = {"cuda_binding": cuda_binding} if backend == "tensorrt" else {}
    try:
        with contextlib.ExitStack() as stack:
            runners = {"fp32": stack.enter_context(open_runner(bundle, "onnxruntime", precision="fp32"))}
            if not same_model:
                runners["built"] = stack.enter_context(open_runner(bundle, backend, **options))
            if fp32_same_backend is not None:
                runners["fp32 here"] = fp32_same_backend
            built_name = runners.get("built", runners["fp32"]).describe()
            runs = run(runners, inputs, rounds=TIMED_RUNS)
    except (RunnerError, BundleError) as e:
        raise BuildError(f"{bundle.path}: accuracy gate could not run the built model ({e})") from None
    runs.setdefault("built", runs["fp32"])
    speed_fp32 = runs.get("fp32 here") or (runs["fp32"] if backend == "onnxruntime" else runs["built"])
    agreement = compare(runs["fp32"].outputs, runs["built"].outputs, liver)
    accuracy = AccuracyCheck(
        reference="model.onnx (fp32) on onnxruntime cpu",
        runner=built_name,
        volumes=tuple(names),
        dice=tuple(round(d, 6) for d in agreement.dice),
        dice_min=agreement.dice_min,
        dice_mean=agreement.dice_mean,
        argmax_agreement=agreement.argmax_agreement,
        max_abs_logit_error=agreement.max_abs_error,
        min_agreement=min_agreement,
        passed=agreement.dice_min >= min_agreement,
    )
    fp32_ms, built_ms = speed_fp32.median_ms, runs["built"].median_ms
    speed = SpeedCheck(
        device=built_name,
        fp32_ms=fp32_ms,
        built_ms=built_ms,
        ratio=built_ms / fp32_ms if fp32_ms > 0 else float("nan"),
        runs=len(runs["built"].ms),
    )
    return accuracy, speed


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle to `out`, replacing an older bundle there."""
    os.chmod(tmp, 0o755)  # mkdtemp made it private
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
