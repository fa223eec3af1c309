"""fp32 ONNX -> fp16 ONNX with fp32 input and output: the file strongly typed TensorRT builds
take for FP16 (TensorRT >= 10 reads precision from the tensors, not from builder flags)."""

from __future__ import annotations

from liverkd.core.atomic import atomic_path


def to_fp16(onnx_in, onnx_out) -> None:
    """fp16 weights and activations, fp32 input/output (the file strongly typed TensorRT builds take).

    On ONNX Runtime's CPU provider this file runs, but as fp32 arithmetic: ORT inserts casts
    where its CPU kernels have no fp16 version (Conv, ConvTranspose on x86), so expect fp32's
    speed at best and fp16-rounded weights.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_in)), keep_io_types=True)
    topological_sort(model.graph)  # the converter appends its input casts at the end
    onnx.checker.check_model(model)
    with atomic_path(onnx_out, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))


def topological_sort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            raise ValueError(f"graph {graph.name!r} has a cycle or a dangling input")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if all(n is not r for r in runnable)]
    nodes = [type(n)() for n in ordered]
    for new, old in zip(nodes, ordered, strict=True):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)
