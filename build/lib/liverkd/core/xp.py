"""The array-module switch: the core's functions take numpy arrays (CPU) or CuPy arrays (GPU)
and run on whichever they are given, with scipy.ndimage or cupyx.scipy.ndimage to match.

One pipeline, not two: a volume uploaded once (`to_device`) goes through reorientation,
resampling, windowing, padding, the network, the probability's way back, the threshold and the
largest component on the GPU, and only the uint8 mask comes back (`to_host`). CuPy is never
imported unless an array is already a CuPy array or a device is asked for.
"""

from __future__ import annotations

import numpy as np


def is_device(array) -> bool:
    """A CuPy (GPU) array, by its type's module, without importing CuPy."""
    return type(array).__module__.split(".")[0] == "cupy"


def of(array):
    """numpy or cupy: the module of `array`."""
    if is_device(array):
        import cupy

        return cupy
    return np


def ndimage_of(array):
    """scipy.ndimage or cupyx.scipy.ndimage, for `array`."""
    if is_device(array):
        from cupyx.scipy import ndimage
    else:
        from scipy import ndimage
    return ndimage


def like(values, array):
    """Host `values` (indices, weights) as an array of `array`'s module."""
    return of(array).asarray(values)


def to_host(array) -> np.ndarray:
    """A numpy array (one download for a CuPy array, no copy for a numpy one)."""
    return array.get() if is_device(array) else np.asarray(array)


def to_device(array):
    """A CuPy array on the current GPU (one upload). Raises ImportError without CuPy."""
    import cupy

    return cupy.asarray(array)
