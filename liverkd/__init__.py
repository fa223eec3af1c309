"""liverkd: real-time 3-D liver CT segmentation, distilled for the edge.

The shared core (this package) depends on numpy, scipy and nibabel only: never torch.
"""

__version__ = "0.1.0"
