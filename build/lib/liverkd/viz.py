"""PNGs to glance at: slices through the liver with the mask over them (one inference result,
or the first cases of a synthetic data set). matplotlib is imported only when a PNG is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from liverkd.core import volume as V
from liverkd.core.atomic import atomic_path

CT_WINDOW = (-175.0, 250.0)


def _canonical_view(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS-ordered view of `array` (no copy: flips and transposes only)."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    return nib.orientations.apply_orientation(array, ornt)


def _slices(image, mask, affine, names=("axial", "coronal", "sagittal"), extra=()):
    """(name, image slice, [mask slices], aspect) through the mask's centre (the volume's centre
    if it is empty), canonical RAS, transposed for imshow and in radiological convention
    (patient's right on the left of the axial and coronal views). `extra`: more masks, sliced alike."""
    img = _canonical_view(np.asarray(image), affine)
    masks = [_canonical_view(np.asarray(m), affine) for m in (mask, *extra)]
    canon_affine = affine @ nib.orientations.inv_ornt_aff(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")),
        np.asarray(image).shape[:3],
    )
    sx, sy, sz = V.spacing_of(canon_affine)
    msk = masks[0]
    if msk.any():
        centre = [int(round(np.mean(idx))) for idx in np.nonzero(msk[::2, ::2, ::2])]
        centre = [min(2 * c, n - 1) for c, n in zip(centre, msk.shape)]
    else:
        centre = [n // 2 for n in msk.shape]
    cx, cy, cz = centre
    cut = {
        "axial": (np.s_[:, :, cz], sy / sx),
        "coronal": (np.s_[:, cy, :], sz / sx),
        "sagittal": (np.s_[cx, :, :], sz / sy),
    }
    out = []
    for name in names:
        index, aspect = cut[name]
        planes = [np.asarray(a[index], np.float32).T for a in (img, *masks)]
        if name != "sagittal":  # radiological: patient's right (+x in RAS) on the left of the screen
            planes = [p[:, ::-1] for p in planes]
        out.append((name, planes[0], [p > 0 for p in planes[1:]], aspect))
    return out


def _draw(ax, title, im, masks, aspect, window, *, fill: bool) -> None:
    """One slice in grey with the first mask outlined in red (and filled if `fill`), the others in green."""
    ax.imshow(im, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
    if fill:
        mk = masks[0]
        ax.imshow(np.ma.masked_where(~mk, mk), cmap="autumn", alpha=0.45, origin="lower", aspect=aspect, vmin=0, vmax=1)
    for mk, colour in zip(masks, ("red", "lime", "cyan")):
        if mk.any():
            ax.contour(mk, levels=[0.5], colors=colour, linewidths=0.8, origin="lower")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def _pyplot():
    from liverkd.extras import require

    matplotlib = require("matplotlib", "--preview")  # one line naming the `plot` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_preview(image, mask, affine, path, *, window=None, title: str | None = None, reference=None) -> Path:
    """Three orthogonal slices through the mask's centre (the volume's centre if it is empty).

    Shown in radiological convention, with the voxel aspect ratio of the input. `window` =
    (low, high) display range; None uses the 1st..99th percentile (for inputs that are not CT
    in HU). `reference`: a second mask on the same grid, outlined in green.
    """
    plt = _pyplot()
    if window is None:
        sample = np.asarray(image)[::4, ::4, ::4]
        window = tuple(float(v) for v in np.percentile(sample, [1, 99]))
    extra = () if reference is None else (reference,)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=100)
    for ax, (name, im, masks, aspect) in zip(axes, _slices(image, mask, affine, extra=extra)):
        _draw(ax, name, im, masks, aspect, window, fill=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def preview(cases, out_png, window=CT_WINDOW) -> Path:
    """PNG: per case (a column) an axial and a coronal slice through the liver, liver outlined.

    cases: (image Volume, label Volume, title) triples, any orientation."""
    plt = _pyplot()
    cases = list(cases)
    fig, axes = plt.subplots(2, len(cases), figsize=(3.4 * len(cases), 7.0), dpi=110, squeeze=False)
    for col, (image, label, title) in enumerate(cases):
        views = _slices(image.array, label.array, image.affine, names=("axial", "coronal"))
        for row, (name, im, masks, aspect) in enumerate(views):
            _draw(axes[row, col], f"{title}\n{name}" if row == 0 else name, im, masks, aspect, window, fill=False)
    fig.tight_layout()
    return _save(fig, out_png)


def preview_dataset(out_dir, max_cases: int = 4, out_png=None) -> Path:
    """OUT_DIR/preview.png (or `out_png`) for a data set written by liverkd.core.synth.write_dataset."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "dataset.json").read_text())
    cases = []
    for record in meta["training"][:max_cases]:
        info = record.get("phantom", {})
        name = Path(record["image"]).name.split(".")[0]
        title = f"{name} {info.get('anatomy', '')}\n{info.get('phase', '')} liver {info.get('liver_hu', '')} HU"
        cases.append((V.load(out_dir / record["image"]), V.load(out_dir / record["label"]), title))
    return preview(cases, out_png or out_dir / "preview.png")
