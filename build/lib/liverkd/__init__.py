"""liverkd: real-time 3-D liver CT segmentation, distilled for the edge.

    import liverkd
    mask = liverkd.segment("ct.nii.gz")           # Nifti1Image: uint8, the input's shape and affine
    mask = liverkd.segment((array, affine))       # voxels already in memory; also a nibabel image

    from liverkd import Segmenter                 # warm, for repeated calls
    seg = Segmenter.load("engines/NAME")          # or liverkd.models.path("student-30k")
    out = seg.segment("ct.nii.gz", probability=True)  # .image, .mask, .probability, .timings

Layers (arrows run one way): liverkd.cli -> liverkd.distill | liverkd.deploy -> liverkd.core.
The public names are imported lazily, so `import liverkd` pulls in nothing heavy and never torch.
"""

__version__ = "0.1.0"
__all__ = ["Segmenter", "__version__", "segment"]


def __getattr__(name):
    if name in ("Segmenter", "segment"):
        from liverkd.deploy import segment as module

        return getattr(module, name)
    raise AttributeError(f"module 'liverkd' has no attribute {name!r}")
