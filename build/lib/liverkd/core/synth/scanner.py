"""The acquisition model: noise-free HU on the output grid -> a CT-like int16 image.

In order: a calibration offset and a smooth bias field inside the body (cupping, beam
hardening), blur by the in-plane PSF and the slice profile, thick slices sampled coarsely along
z and interpolated back (as resampling a 5 mm series to 3 mm does), noise from white to
correlated at 3-30 HU sd on the output grid, the reconstruction circle, and the clipping some data sets apply
(3D-IRCADb stores HU clipped to about [-1024, 1024]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverkd.core.synth.fields import smooth_field

FWHM_TO_SIGMA = 1 / 2.355


@dataclass
class Scanner:
    psf_mm: float  # in-plane FWHM
    slice_mm: float  # slice thickness (FWHM of the slice profile)
    slice_interval_mm: float
    noise_hu: float
    noise_correlation: float  # 0 white, 1 all correlated
    noise_grain_vox: float  # correlation length of the correlated part (voxels)
    bias_hu: float
    bias_cell_mm: float
    offset_hu: float
    clip: tuple[int, int]
    circle: tuple[float, int] | None  # (radius as a fraction of the half FOV, value outside)

    def describe(self) -> dict:
        return {
            "psf_mm": round(self.psf_mm, 2),
            "slice_mm": round(self.slice_mm, 2),
            "noise_hu": round(self.noise_hu, 1),
            "noise_correlation": round(self.noise_correlation, 2),
            "bias_hu": round(self.bias_hu, 1),
            "clip": list(self.clip),
        }


def draw_scanner(rng: np.random.Generator) -> Scanner:
    u = rng.uniform
    slice_mm = u(0.5, 1.5) if u() < 0.5 else u(1.5, 5.0)  # thin modern series, or thick (older, LiTS-like)
    circle = (u(0.85, 1.1), int(rng.choice([-1024, -2048, -3024]))) if u() < 0.3 else None
    return Scanner(
        psf_mm=u(0.6, 1.6),
        slice_mm=slice_mm,
        slice_interval_mm=slice_mm * u(0.6, 1.0),
        noise_hu=float(np.exp(u(np.log(3), np.log(30)))),
        noise_correlation=u(0, 1),
        noise_grain_vox=u(0.6, 1.5),
        bias_hu=u(0, 25),
        bias_cell_mm=u(150, 350),
        offset_hu=u(-6, 6),
        clip=(-1024, 1024) if u() < 0.25 else (-1024, 3071),
        circle=circle,
    )


def acquire(hu: np.ndarray, body: np.ndarray, spacing, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """int16 CT image from noise-free HU (float32, changed in place) and the body weight."""
    spacing = np.asarray(spacing, float)
    hu += (scanner.offset_hu + scanner.bias_hu * smooth_field(rng, hu.shape, spacing, scanner.bias_cell_mm)) * body
    sigma_mm = np.array([scanner.psf_mm, scanner.psf_mm, np.hypot(scanner.psf_mm, scanner.slice_mm)]) * FWHM_TO_SIGMA
    img = ndimage.gaussian_filter(hu, sigma_mm / spacing, mode="nearest", truncate=3.0)
    factor = scanner.slice_interval_mm / spacing[2]
    n_z = img.shape[2]
    if factor > 1.25 and n_z >= 4:  # thick slices: acquire on the coarse z grid, interpolate back
        img = ndimage.zoom(img, (1, 1, max(2, round(n_z / factor)) / n_z), order=1, mode="nearest", grid_mode=True)
    img += scanner.noise_hu * _noise(rng, img.shape, scanner)
    if img.shape[2] != n_z:
        img = ndimage.zoom(img, (1, 1, n_z / img.shape[2]), order=1, mode="nearest", grid_mode=True)
    img = np.clip(np.rint(img), *scanner.clip)
    if scanner.circle:
        fraction, value = scanner.circle
        half = min(img.shape[0] * spacing[0], img.shape[1] * spacing[1]) / 2
        x = (np.arange(img.shape[0]) - (img.shape[0] - 1) / 2) * spacing[0]
        y = (np.arange(img.shape[1]) - (img.shape[1] - 1) / 2) * spacing[1]
        outside = np.hypot(x[:, None], y[None, :]) > fraction * half
        img[outside] = max(value, scanner.clip[0]) if scanner.clip[1] <= 1024 else value
    return img.astype(np.int16)


def _noise(rng, shape, scanner: Scanner) -> np.ndarray:
    """Unit-sd noise: a mix of white and Gaussian-correlated (CT noise has a grain)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    grain = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), scanner.noise_grain_vox, mode="wrap")
    grain /= max(float(grain.std()), 1e-6)
    c = scanner.noise_correlation
    return np.sqrt(1 - c) * white + np.sqrt(c) * grain
