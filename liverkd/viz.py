"""A PNG to glance at: axial, coronal and sagittal slices through the liver with the mask overlaid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core import volume as V
from liverkd.core.atomic import atomic_path


def _canonical_view(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS-ordered view of `array` (no copy: flips and transposes only)."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    return nib.orientations.apply_orientation(array, ornt)


def write_preview(image, mask, affine, path, *, window=None, title: str | None = None) -> Path:
    """Three orthogonal slices through the mask's centre (the volume's centre if it is empty).

    Shown in radiological convention (patient's right on the left of the axial and coronal
    views), with the voxel aspect ratio of the input. `window` = (low, high) display range;
    None uses the 1st..99th percentile (for inputs that are not CT in HU).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = _canonical_view(np.asarray(image), affine)
    msk = _canonical_view(np.asarray(mask), affine)
    canon_affine = affine @ nib.orientations.inv_ornt_aff(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")),
        np.asarray(image).shape[:3],
    )
    sx, sy, sz = V.spacing_of(canon_affine)
    if msk.any():
        centre = [int(round(np.mean(idx))) for idx in np.nonzero(msk[::2, ::2, ::2])]
        centre = [min(2 * c, n - 1) for c, n in zip(centre, msk.shape)]
    else:
        centre = [n // 2 for n in msk.shape]
    cx, cy, cz = centre
    if window is None:
        sample = img[::4, ::4, ::4]
        window = tuple(float(v) for v in np.percentile(sample, [1, 99]))
    views = [
        ("axial", img[:, :, cz], msk[:, :, cz], sy / sx),  # x across, y up
        ("coronal", img[:, cy, :], msk[:, cy, :], sz / sx),  # x across, z up
        ("sagittal", img[cx, :, :], msk[cx, :, :], sz / sy),  # y across, z up
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=100)
    for ax, (name, im, mk, aspect) in zip(axes, views):
        im = np.asarray(im, dtype=np.float32).T
        mk = np.asarray(mk).T > 0
        if name != "sagittal":  # radiological: patient's right (+x in RAS) on the left of the screen
            im, mk = im[:, ::-1], mk[:, ::-1]
        ax.imshow(im, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
        ax.imshow(np.ma.masked_where(~mk, mk), cmap="autumn", alpha=0.45, origin="lower", aspect=aspect, vmin=0, vmax=1)
        if mk.any():
            ax.contour(mk, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
