"""Optional accelerators of the CPU path, each with a plain fallback that gives the same result.

- gzip: ISA-L (`isal`, the `fast` extra) decompresses a CT about 2x and compresses a mask about
  10x faster than zlib; without it, zlib.
- connected components: `cc3d` (connected-components-3d, the `fast` extra) labels a grid several
  times faster than scipy.ndimage.label; without it, scipy.

`plain()` (or LIVERKD_PLAIN=1) turns every accelerator off (these two, and the reader's block mean
summed on a second thread while the file inflates, liverkd.core.volume.load): the reference path
that benchmarks/e2e.py and the tests compare the fast path against.
"""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager

import numpy as np

from liverkd.core import xp

_plain = os.environ.get("LIVERKD_PLAIN", "") == "1"


@contextmanager
def plain():
    """Within this block, use only numpy, scipy and zlib."""
    global _plain
    old, _plain = _plain, True
    try:
        yield
    finally:
        _plain = old


def is_plain() -> bool:
    """True inside plain() (or with LIVERKD_PLAIN=1): take the reference path everywhere."""
    return _plain


def _isal_zlib():
    if _plain:
        return None
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return isal_zlib


def _cc3d():
    if _plain:
        return None
    try:
        import cc3d
    except ImportError:
        return None
    return cc3d


def available() -> dict[str, str]:
    """What the fast path uses on this machine now (for stats, profile and benchmarks)."""
    return {"gzip": "isal" if _isal_zlib() else "zlib", "components": "cc3d" if _cc3d() else "scipy"}


def stage_paths() -> dict[str, str]:
    """Which implementation each pipeline stage takes now (profile prints it beside the stage)."""
    now = available()
    gz, cc = now["gzip"], now["components"]
    return {
        "read": f"{gz} gunzip, voxels viewed in place" + ("" if _plain else "; block mean summed while inflating"),
        "reorient_resample": "views; block mean in memory order" + (" (plain)" if _plain else ", from the read"),
        "postprocess": f"{cc} components",
        "resample_back": "full trilinear + threshold" if _plain else "straddling cells only, in the input's directions",
        "write": f"{gz} level 1",
    }


GZIP = 31  # wbits: a gzip wrapper


def gunzip(data, max_bytes: int) -> bytes:
    """The first `max_bytes` of a gzip stream (all its members), or fewer if it ends first.

    Stopping at `max_bytes` bounds the memory a lying header or a compression bomb can take,
    and reads only the first volume of a 4-D image."""
    out = list(gunzip_chunks(data, max_bytes, len(data)))
    return out[0] if len(out) == 1 else b"".join(out)


def gunzip_chunks(data, max_bytes: int, chunk: int):
    """gunzip's bytes in pieces, as they are inflated (a generator), from `chunk` compressed
    bytes at a time: a reader can use each piece on another thread while the next one inflates
    (ISA-L and zlib release the GIL). Raises ValueError on corrupt data."""
    module = _isal_zlib() or zlib
    left = max_bytes
    view = memoryview(data)
    chunk = max(1, int(chunk))
    try:
        while left > 0 and len(view):
            d = module.decompressobj(GZIP)
            end = 0
            while left > 0 and not d.eof and end < len(view):
                start, end = end, min(end + chunk, len(view))
                piece = d.decompress(view[start:end], left)
                if piece:
                    left -= len(piece)
                    yield piece
            if not d.eof:
                break  # max_bytes reached, or the stream is truncated (the caller checks the length)
            rest = view[end:]  # after this member: what its last input held beyond it, then the input not fed
            view = memoryview(bytes(d.unused_data) + bytes(rest)) if len(rest) else memoryview(d.unused_data)
    except (zlib.error, module.error) as e:
        raise ValueError(f"corrupt gzip data: {e}") from None


def gzip_compress(chunks, level: int) -> bytes:
    """One gzip member of the concatenated `chunks` (bytes-like). ISA-L levels are 0-3: a zlib
    level above 3 maps to ISA-L's 3."""
    isal = _isal_zlib()
    c = isal.compressobj(min(level, 3), isal.DEFLATED, GZIP) if isal else zlib.compressobj(level, zlib.DEFLATED, GZIP)
    return b"".join([*(c.compress(chunk) for chunk in chunks), c.flush()])


def component_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Labels of the connected components of a boolean 3-D mask (0 = background) and their count.
    connectivity: 6 (faces), 18 or 26 (faces, edges and corners). A CuPy mask is labelled on
    its GPU (cupyx.scipy.ndimage.label)."""
    if xp.is_device(mask):
        labels, n = xp.ndimage_of(mask).label(mask, structure=xp.like(_structure(connectivity), mask))
        return labels, int(n)
    cc3d = _cc3d()
    if cc3d is not None:
        labels, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
        return labels, int(n)
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=_structure(connectivity))
    return labels, int(n)


def _structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
