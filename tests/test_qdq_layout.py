"""The INT8 Q/DQ ONNX is laid out the way TensorRT's explicit quantization needs it (walked node by node).

TensorRT: Q/DQ on the inputs of weighted layers (activation and weight), none on their outputs and
none on the graph output; symmetric int8 (zero point 0); Conv weights per output channel (axis 0);
ConvTranspose weights per-tensor or axis 0 (its kernels do not take per-output-channel scales,
NVIDIA/TensorRT#2380); biases in float; weights as float initialisers through Q -> DQ.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from liverkd.deploy import calibrate as C
from tests._checkpoints import SPEC

WEIGHTED = ("Conv", "ConvTranspose")
QDQ = ("QuantizeLinear", "DequantizeLinear")


def unet_onnx(path, shape=SPEC.input_shape, width=2, seed=0):
    """A two-level 3-D U-Net written with onnx.helper, no torch: Conv+Relu, MaxPool, ConvTranspose,
    Concat (skip), 1x1 head -> logits. The exported students have the same operators."""
    rng = np.random.default_rng(seed)
    weights = []

    def const(name, *dims):
        weights.append(numpy_helper.from_array(rng.normal(0.0, 0.5, dims).astype(np.float32), name))
        return name

    def conv(x, out, cin, cout, k=3):
        w, b = const(f"{out}.weight", cout, cin, k, k, k), const(f"{out}.bias", cout)
        return helper.make_node("Conv", [x, w, b], [out], pads=[k // 2] * 6)

    def relu(x):
        return helper.make_node("Relu", [x], [f"{x}.relu"])

    pool = [2, 2, 2]
    nodes = [
        conv("input", "c0", 1, width),
        relu("c0"),
        helper.make_node("MaxPool", ["c0.relu"], ["p0"], kernel_shape=pool, strides=pool),
        conv("p0", "c1", width, 2 * width),
        relu("c1"),
        helper.make_node(
            "ConvTranspose",
            ["c1.relu", const("up.weight", 2 * width, width, 2, 2, 2), const("up.bias", width)],
            ["up"],
            strides=pool,
        ),
        helper.make_node("Concat", ["c0.relu", "up"], ["cat"], axis=1),
        conv("cat", "c2", 2 * width, width),
        relu("c2"),
        conv("c2.relu", "logits", width, 2, k=1),
    ]
    graph = helper.make_graph(
        nodes,
        "unet",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, *shape])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2, *shape])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module", params=["exported student-30k", "hand-built U-Net"])
def fp32_onnx(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32")
    if request.param == "hand-built U-Net":
        return unet_onnx(folder / "m.onnx")
    pytest.importorskip("torch", reason="exporting a student needs torch")
    from liverkd.deploy.export import export_onnx
    from tests._checkpoints import make_checkpoint

    return export_onnx(make_checkpoint(folder / "m.pt"), folder / "m.onnx").path


def qdq_layout_problems(model: onnx.ModelProto) -> list[str]:
    """Everything in `model` that TensorRT's explicit quantization would refuse or run badly; [] when none."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    problems = []

    def producer_of(tensor, op_type):
        node = producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.op_type in QDQ:
            zero_point = consts.get(node.input[2]) if len(node.input) > 2 else None
            if zero_point is None or zero_point.dtype != np.int8 or zero_point.any():
                problems.append(f"{name}: zero point is not int8 0 (TensorRT needs symmetric int8)")
        if node.op_type == "DequantizeLinear":
            for user in consumers[node.output[0]]:
                if user.op_type not in WEIGHTED:
                    problems.append(f"{name}: DQ feeds {user.op_type} {user.output[0]}, not a weighted layer's input")
        if node.op_type not in WEIGHTED:
            continue
        dq = producer_of(node.input[0], "DequantizeLinear")
        if dq is None or producer_of(dq.input[0], "QuantizeLinear") is None:
            problems.append(f"{name}: data input {node.input[0]} has no Q -> DQ")
        elif consts[dq.input[1]].size != 1:
            problems.append(f"{name}: data input quantized per channel (TensorRT: per-tensor activations)")
        dq = producer_of(node.input[1], "DequantizeLinear")
        if dq is None:
            problems.append(f"{name}: weight {node.input[1]} is not quantized")
            continue
        q = producer_of(dq.input[0], "QuantizeLinear")
        weight = consts.get(q.input[0] if q is not None else dq.input[0])
        if q is None or weight is None or weight.dtype != np.float32:
            problems.append(f"{name}: weight is not a float initialiser through Q -> DQ (int8 straight into DQ)")
        scales = consts[dq.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        per_axis_0 = weight is not None and axis == 0 and scales.size == weight.shape[0]
        if node.op_type == "Conv" and not per_axis_0:
            problems.append(f"{name}: Conv weight has {scales.size} scales on axis {axis}, not per output channel")
        if node.op_type == "ConvTranspose" and not (per_axis_0 or scales.size == 1):
            problems.append(
                f"{name}: ConvTranspose weight has {scales.size} scales on axis {axis} (TensorRT: axis 0 or per-tensor)"
            )
        if len(node.input) > 2 and (node.input[2] not in consts or consts[node.input[2]].dtype != np.float32):
            problems.append(f"{name}: bias {node.input[2]} is not a float initialiser")
    for output in model.graph.output:
        near = [producer[output.name], *consumers[output.name]] if output.name in producer else []
        if any(n.op_type in QDQ for n in near):
            problems.append(f"graph output {output.name} goes through Q/DQ (the logits stay float)")
    return problems


def test_int8_onnx_has_the_qdq_layout_tensorrt_needs(tmp_path, fp32_onnx):
    inputs = [C.phantom_input(SPEC, seed) for seed in (1, 2)]
    C.quantize_int8(fp32_onnx, tmp_path / "m.int8.onnx", inputs, "minmax", tmp_path / "ranges.json")
    model = onnx.load(str(tmp_path / "m.int8.onnx"))
    onnx.checker.check_model(model)  # nodes in topological order, as TensorRT's parser reads them
    problems = qdq_layout_problems(model)
    assert not problems, f"{len(problems)} layout problems:\n" + "\n".join(problems)
    weighted = [n for n in model.graph.node if n.op_type in WEIGHTED]
    assert weighted and sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 2 * len(weighted)


def test_the_layout_check_sees_the_old_layout(tmp_path, fp32_onnx):
    """ONNX Runtime's defaults (all outputs quantized, int8 weights, axis 1 for ConvTranspose) fail the check."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": C.phantom_input(SPEC, 1)}])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(
        str(fp32_onnx),
        str(tmp_path / "default.onnx"),
        Reader(),
        per_channel=True,
        activation_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "QuantizeBias": False},
    )
    problems = "\n".join(qdq_layout_problems(onnx.load(str(tmp_path / "default.onnx"))))
    for expected in ("int8 straight into DQ", "not a weighted layer's input", "ConvTranspose weight", "graph output"):
        assert expected in problems
