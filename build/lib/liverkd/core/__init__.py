"""The shared core: numpy, scipy and nibabel only (never torch, tensorrt, matplotlib, rich or typer).

Training (liverkd.distill) and deployment (liverkd.deploy) both build on it, so the
preprocessing and the inference path they use are the same code.
"""
