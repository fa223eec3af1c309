"""Serving liverkd with NVIDIA Triton Inference Server (docs/serving.md).

    repository  `liverkd export-triton`: an engine bundle -> a Triton model repository
                (liver_seg: pre/post-processing, Python backend; liver_net: the network)
    seg_model   liver_seg's TritonPythonModel: NIfTI bytes in, mask NIfTI bytes out, through
                liverkd.core's one inference path, the network called by BLS
    net_model   liver_net's TritonPythonModel where the server has no ONNX Runtime backend
                (pytriton's bundled tritonserver): liverkd's own ONNX Runtime runner
    client      `liverkd triton-infer`: a NIfTI file to the server, the mask back to a file
    server      a local tritonserver from the nvidia-pytriton wheel (tests, benchmark, `triton-serve`)

Nothing here is imported by the rest of liverkd; tritonclient and pytriton only where used.
"""
