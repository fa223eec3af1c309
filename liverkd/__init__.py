"""liverkd: real-time 3-D liver CT segmentation, distilled for the edge.

    from liverkd import Segmenter
    seg = Segmenter.load("engines/NAME")          # or the packaged default model
    out = seg.segment(nib.load("ct.nii.gz"))      # out.image: uint8 mask on the input's grid

Layers (arrows run one way): liverkd.cli -> liverkd.distill | liverkd.deploy -> liverkd.core.
The public names are imported lazily, so `import liverkd` pulls in nothing heavy and never torch.
"""

__version__ = "0.1.0"
__all__ = ["Segmenter", "__version__"]


def __getattr__(name):
    if name == "Segmenter":
        from liverkd.deploy.segment import Segmenter

        return Segmenter
    raise AttributeError(f"module 'liverkd' has no attribute {name!r}")
