"""Seeded synthetic abdominal CT with a liver mask (tests, the demo, default calib_data).

Each seed draws one patient in physical millimetres, in a patient frame: x towards the
patient's right, y anterior, z superior, z = 0 at the apex of the right diaphragm dome.
That patient is then sampled on whatever grid is asked for, so one seed gives the same
anatomy at any shape or spacing (only the noise realisation depends on the grid).

World coordinates are RAS+ as in nibabel: +x points to the patient's RIGHT, +y anterior,
+z superior. The affine written here is diagonal and positive, so the liver (patient's
right) lies at HIGH x voxel indices, as in the real TotalSegmentator CT in ../shared/data
(RAS; liver centroid at x index 81 of 122).

What makes it hard: a spleen within ~10 HU of the liver, the heart resting on the dome over
the left lobe, right kidney, stomach and gallbladder pressed against the liver, vessels and
hypodense lesions that belong to the liver label (as in LiTS), three contrast phases,
noise, blur, body-size and liver-shape variation, and fields of view that cut the liver.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from liverkd.core import volume as V
from liverkd.core.atomic import write_json

FOV_MM = 384.0
"""Default field of view per axis; spacing = FOV_MM / shape (64^3 -> 6 mm voxels)."""

PHASE_PROBABILITY = {"native": 0.35, "arterial": 0.15, "portal": 0.5}

# Mean HU per tissue and contrast phase (portal-venous ~70 s after injection).
PHASE_HU = {
    "native": dict(liver=55, spleen=47, kidney_cortex=32, kidney_medulla=30, aorta=42, portal=40, caval=40,
                   heart_blood=42, myocardium=45, muscle=50, pancreas=40, gut=35),
    "arterial": dict(liver=72, spleen=112, kidney_cortex=190, kidney_medulla=85, aorta=290, portal=130, caval=75,
                     heart_blood=250, myocardium=95, muscle=56, pancreas=115, gut=60),
    "portal": dict(liver=110, spleen=116, kidney_cortex=170, kidney_medulla=160, aorta=150, portal=170, caval=145,
                   heart_blood=150, myocardium=100, muscle=60, pancreas=100, gut=70),
}  # fmt: skip
FIXED_HU = dict(air=-1000, fat=-100, lung=-850, gas=-990, fluid=12, bile=8, cortical=750, cancellous=230, disc=80,
                csf=15, cyst=10)  # fmt: skip
LIVER_SD = {"native": 6.0, "arterial": 8.0, "portal": 12.0}
"""Patient-to-patient spread of liver enhancement; other tissues get 8% of their mean."""


# ---------------------------------------------------------------- random smooth fields


class Waves:
    """A smooth random 3-D displacement field: a sum of plane waves (exact at any point)."""

    def __init__(self, rng: np.random.Generator, n: int, amplitude_mm: float, wavelength_mm=(90.0, 220.0)):
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(*wavelength_mm, size=(n, 1))
        self.k = (2 * np.pi * direction / wavelength).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
        self.amp = (rng.normal(size=(n, 3)) * amplitude_mm / np.sqrt(n / 2)).astype(np.float32)

    def __call__(self, x, y, z):
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        out = [np.zeros(shape, np.float32) for _ in range(3)]
        for k, phase, amp in zip(self.k, self.phase, self.amp, strict=True):
            s = np.sin(k[0] * x + k[1] * y + k[2] * z + phase)
            for axis in range(3):
                out[axis] += amp[axis] * s
        return out

    def on_grid(self, axes, matrix, offset):
        """The field at p = matrix @ (x, y, z) + offset over the grid of 1-D `axes`.

        Each wave factorises into per-axis complex exponentials, so the sum over waves is a
        matrix product instead of a sine per wave per voxel."""
        n = len(self.k)
        k_world = self.k.astype(np.float64) @ np.asarray(matrix, np.float64)
        const = self.k.astype(np.float64) @ np.asarray(offset, np.float64) + self.phase
        ex, ey, ez = (np.exp(1j * k_world[:, i, None] * np.asarray(a, np.float64)[None, :]) for i, a in enumerate(axes))
        ez = ez * np.exp(1j * const)[:, None]
        exy = (ex[:, :, None] * ey[:, None, :]).reshape(n, -1).astype(np.complex64)
        shape = tuple(len(a) for a in axes)
        return [
            (exy.T @ (self.amp[:, i : i + 1] * ez).astype(np.complex64)).imag.reshape(shape) for i in range(3)
        ]


class Lattice:
    """Smooth random scalar field (unit variance) on a fixed lattice over a box of the patient
    frame, interpolated trilinearly, so it does not depend on the sampling grid."""

    BOX = ((-300.0, -250.0, -500.0), (300.0, 250.0, 350.0))
    """Covers the organ frame of any field of view the default draws put on the patient."""

    def __init__(self, rng: np.random.Generator, cell_mm: float, box=BOX):
        self.step = cell_mm / 2
        self.lo = np.asarray(box[0], np.float32)
        shape = tuple(int(np.ceil((h - lo) / self.step)) + 1 for lo, h in zip(*box, strict=True))
        grid = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0, mode="wrap")
        self.grid = grid / grid.std()

    def __call__(self, x, y, z):
        coords = [(np.asarray(c, np.float32) - lo) / self.step for c, lo in zip((x, y, z), self.lo, strict=True)]
        return ndimage.map_coordinates(self.grid, np.broadcast_arrays(*coords), order=1, mode="nearest",
                                       prefilter=False)  # fmt: skip


# ---------------------------------------------------------------- shapes


def ellipsoid(x, y, z, center, radii, yaw_deg: float = 0.0):
    """Quadratic form: < 1 inside the ellipsoid; yaw turns it about z."""
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if yaw_deg:
        c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2


def softmin(values, k: float = 4.0):
    """Smooth union of quadratic forms (organ lobes blend with a fillet)."""
    low = np.minimum.reduce(values)
    return low - np.log(sum(np.exp(-k * (v - low)) for v in values)) / k


def capsules(points: np.ndarray, segments) -> np.ndarray:
    """Boolean per point (N, 3): inside any capsule (a, b, radius)."""
    inside = np.zeros(len(points), bool)
    for a, b, r in segments:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        box = np.all((points >= np.minimum(a, b) - r) & (points <= np.maximum(a, b) + r), axis=1)
        idx = np.flatnonzero(box)
        if idx.size == 0:
            continue
        p = points[idx]
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-6), 0, 1)
        d2 = ((p - a - t[:, None] * ab) ** 2).sum(axis=1)
        inside[idx[d2 < r * r]] = True
    return inside


def branch_tree(rng, start, direction, length, radius, depth: int, spread_deg: float = 45.0):
    """Segments of a random binary vessel tree (each child shorter and thinner)."""
    start, direction = np.asarray(start, float), np.asarray(direction, float)
    direction = direction / np.linalg.norm(direction)
    end = start + direction * length
    segments = [(start, end, radius)]
    if depth > 0:
        for _ in range(2):
            turn = direction + np.tan(np.radians(spread_deg)) * rng.normal(size=3) / np.sqrt(2)
            segments += branch_tree(rng, end, turn, length * rng.uniform(0.6, 0.85), radius * 0.7, depth - 1)
    return segments


def points_of(mask, qx, qy, qz) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of `mask` and the (N, 3) organ-frame points there."""
    idx = np.flatnonzero(mask)
    return idx, np.stack([qx.reshape(-1)[idx], qy.reshape(-1)[idx], qz.reshape(-1)[idx]], axis=1)


def scatter(shape, flat_indices) -> np.ndarray:
    """Boolean array of `shape`, True at `flat_indices`."""
    mask = np.zeros(shape, bool)
    mask.reshape(-1)[flat_indices] = True
    return mask


# ---------------------------------------------------------------- the patient


class Patient:
    """All random draws for one synthetic patient; render() samples it at any points."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.phase = str(rng.choice(list(PHASE_PROBABILITY), p=list(PHASE_PROBABILITY.values())))
        self.hu = {k: v + rng.normal(0, 0.08 * abs(v)) for k, v in PHASE_HU[self.phase].items()}
        self.hu["liver"] = PHASE_HU[self.phase]["liver"] + rng.normal(0, LIVER_SD[self.phase])
        self.hu.update({k: v + rng.normal(0, 0.04 * abs(v)) for k, v in FIXED_HU.items()})
        self.hu["spleen"] = self.hu["liver"] + (PHASE_HU[self.phase]["spleen"] - PHASE_HU[self.phase]["liver"]) * u(
            0.3, 1.3
        )

        # Where the field of view sits on the patient; one case in four cuts the liver in z
        # (for the default 384 mm field of view: the top through the liver, or the bottom).
        cut = rng.choice(["none", "top", "bottom"], p=[0.75, 0.125, 0.125])
        centre_z = {"none": u(-120, -60), "top": -FOV_MM / 2 + u(-60, -15), "bottom": FOV_MM / 2 + u(-140, -90)}[cut]
        self.fov_cut = str(cut)
        self.fov_centre = np.array([u(-20, 20), u(-25, 15), centre_z], np.float32)
        self.yaw = np.radians(u(-6, 6))

        # Body: organ scale (cavity) and wall/fat thickness vary independently.
        size = u(0.85, 1.15)
        self.scale = np.array([size * u(0.94, 1.06), size * u(0.94, 1.06), u(0.9, 1.1)], np.float32)
        self.fat = np.array([u(6, 45), u(6, 50), 0], np.float32)  # lateral, anterior; posterior is 60% of it
        self.fat[2] = 0.6 * self.fat[1]
        self.wall = u(8, 15)
        self.body_warp = Waves(rng, 6, amplitude_mm=u(3, 7))
        self.warp_reach = float(np.abs(self.body_warp.amp).sum(axis=0).max()) + 2.0
        self.bowel_field = Lattice(rng, cell_mm=28)
        self.gas_field = Lattice(rng, cell_mm=20)

        # Diaphragm domes (patient frame, mm, at reference size): right higher than left.
        self.dome_right = (u(50, 70), u(-15, 5), 0.0)
        self.dome_left = (u(-75, -55), u(-15, 5), u(-25, -8))
        self.dome_depth = u(80, 100)

        # Liver: lobes as ellipsoids, blended, then deformed.
        j = lambda sd=6.0: rng.normal(0, sd)
        self.liver_lobes = [
            ((62 + j(), -5 + j(), -72 + j(8)), (68 * u(0.85, 1.15), 80 * u(0.85, 1.1), 78 * u(0.85, 1.2)), 0.0),
            ((-5 + j(), 38 + j(), -42 + j()), (u(55, 100), 40 * u(0.8, 1.2), 34 * u(0.8, 1.2)), j(8)),  # left lobe
            ((15 + j(3), -28 + j(3), -55 + j(4)), (22, 22, 32), 0.0),  # caudate
        ]
        if u() < 0.2:  # Riedel's lobe: a tongue of the right lobe reaching down
            self.liver_lobes.append(((85 + j(), 10 + j(), -150 + j(10)), (30, 35, u(35, 55)), 0.0))
        self.left_tip = self.liver_lobes[1][0][0] - self.liver_lobes[1][1][0]
        self.liver_warp = Waves(rng, 8, amplitude_mm=u(8, 16), wavelength_mm=(80, 200))
        self.liver_texture_hu = u(2, 6)
        self.liver_texture = Lattice(rng, cell_mm=12, box=((-160, -160, -280), (200, 160, 60)))
        self.lung_texture = Lattice(rng, cell_mm=14, box=((-300, -250, -150), (300, 250, 350)))

        self.heart = ((-25 + j(), 30 + j(), None), (u(55, 68), u(45, 55), u(48, 58)), u(15, 40))
        self.spleen = ((-92 + j(), -38 + j(), -70 + j(8)), (u(22, 32), u(45, 65), u(40, 58)), u(-45, -25))
        self.stomach = ((-48 + j(), 25 + j(), None), (u(35, 50), u(30, 42), u(45, 60)), u(-20, 20))
        self.stomach_gas = u(0.0, 0.55)
        self.kidneys = [
            ((72 + j(4), -42 + j(4), -158 + j(10)), (u(24, 30), u(22, 27), u(46, 58)), u(-30, -10)),
            ((-70 + j(4), -40 + j(4), -140 + j(10)), (u(24, 30), u(22, 27), u(46, 58)), u(10, 30)),
        ]
        self.gallbladder = ((45 + j(), 45 + j(), -118 + j(8)), (u(12, 18), u(12, 18), u(25, 40)), j(20))
        self.has_gallbladder = u() < 0.85  # cholecystectomy
        self.aorta = (-14 + j(3), -36 + j(3), u(10, 13))
        self.ivc = (22 + j(3), -30 + j(3), u(9, 13))
        self.spine_y = -60 + j(3)
        self.disc_phase = u(0, 33)
        self.rib_phase = u(0, 34)
        pancreas_tail = np.array([-82.0, -25.0, -95.0]) + rng.normal(0, 5, 3)
        self.pancreas = [(pancreas_tail, (-30, -5, -105), 11), ((-30, -5, -105), (5, 0, -112), 11),
                         ((5, 0, -112), (30, -2, -128), 13)]  # fmt: skip
        self.splenic_vein = [((10, -8, -118), pancreas_tail + (0, -8, 0), 5)]
        self.lesions = self._draw_lesions(rng)
        self.portal_tree, self.hepatic_veins = self._draw_vessels(rng)

        self.noise_hu = u(6, 22)
        self.psf_mm = u(0.8, 2.0)

    @classmethod
    def from_seed(cls, seed: int) -> Patient:
        """The patient synth_case(seed) draws (before the scanner adds blur and noise)."""
        return cls(_rngs(seed)[0])

    # ---- draws that need the liver

    def _draw_lesions(self, rng) -> list[tuple]:
        n = int(rng.choice([0, 0, 1, 1, 2, 3, 4, 6]))
        lesions = []
        tries = 0
        while len(lesions) < n and tries < 200:
            tries += 1
            c = rng.uniform((-60, -80, -170), (130, 80, -10))
            if self.liver_value(*c) > 0.55:
                continue
            r = float(np.exp(rng.uniform(np.log(4), np.log(28))))
            kind = "cyst" if rng.uniform() < 0.3 else "metastasis"
            delta = -rng.uniform(22, 60)  # HU below the liver, for a metastasis (a cyst is water)
            lesions.append((c, r * rng.uniform(0.8, 1.2, 3), kind, delta))
        return lesions

    def _draw_vessels(self, rng) -> tuple[list[tuple], list[tuple]]:
        """(portal vein tree from the confluence, hepatic veins from the IVC) as capsules."""
        hilum = np.array([35.0, 5.0, -92.0]) + rng.normal(0, 4, 3)
        confluence = np.array([10.0, -8.0, -118.0])
        portal = [(confluence, hilum, 8.0)]
        portal += branch_tree(rng, hilum, (1, -0.1, 0.25), 40, 6.0, depth=2)  # right portal vein
        portal += branch_tree(rng, hilum, (-1, 0.6, 0.4), 45, 5.0, depth=2)  # left portal vein
        ivc_top = np.array([self.ivc[0], self.ivc[1], -18.0])
        hepatic = []
        for target in ((95, -15, -50), (45, 30, -60), (-30, 25, -38)):  # right, middle, left hepatic veins
            d = np.asarray(target, float) - ivc_top
            hepatic += branch_tree(rng, ivc_top, d, np.linalg.norm(d) * 0.6, 5.5, depth=1, spread_deg=30)
        def as32(segments):
            return [(np.asarray(a, np.float32), np.asarray(b, np.float32), float(r)) for a, b, r in segments]

        return as32(portal), as32(hepatic)

    # ---- geometry in the reference (organ) frame q

    def diaphragm(self, qx, qy):
        def dome(c):
            return c[2] - self.dome_depth * (((qx - c[0]) / 100.0) ** 2 + ((qy - c[1]) / 95.0) ** 2)

        return np.maximum(dome(self.dome_right), dome(self.dome_left))

    def liver_value(self, qx, qy, qz):
        """Smooth-union lobe value (< 1 inside) after the liver's own deformation."""
        dx, dy, dz = self.liver_warp(qx, qy, qz)
        lx, ly, lz = qx + dx, qy + dy, qz + dz
        values = []
        for i, (c, r, yaw) in enumerate(self.liver_lobes):
            if i == 1:  # the left lobe thins towards its tip (patient's left)
                taper = np.clip((lx - self.left_tip) / (1.3 * r[0]), 0.3, 1.0)
                values.append(ellipsoid(lx, ly / taper, lz / taper, (c[0], c[1] / taper, c[2] / taper), r, yaw))
            else:
                values.append(ellipsoid(lx, ly, lz, c, r, yaw))
        return softmin(values)

    def in_ivc(self, qx, qy):
        x, y, r = self.ivc
        return ((qx - x) / (r * 1.2)) ** 2 + ((qy - y) / r) ** 2 < 1

    # ---- rendering

    def frames(self, axes):
        """World grid (RAS, FOV-centred 1-D axes) -> deformed patient frame p (mm), organ frame q."""
        c, s = float(np.cos(self.yaw)), float(np.sin(self.yaw))
        wx, wy, wz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        rotation = [[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]
        dx, dy, dz = self.body_warp.on_grid(axes, rotation, self.fov_centre)
        p = (c * wx + s * wy + self.fov_centre[0] + dx, -s * wx + c * wy + self.fov_centre[1] + dy,
             wz + self.fov_centre[2] + dz)  # fmt: skip
        q = tuple(a / scale for a, scale in zip(p, self.scale, strict=True))
        return p, q

    def window(self, axes, centre, radius: float) -> tuple[slice, slice, slice]:
        """Voxel box (on the world `axes`) that surely holds a ball of `radius` mm at `centre`
        of the organ frame; None in `centre` means the whole axis."""
        d = np.array([0.0 if v is None else v for v in centre]) * self.scale - self.fov_centre
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        world = (c * d[0] - s * d[1], s * d[0] + c * d[1], d[2])
        reach = radius * float(self.scale.max()) + self.warp_reach
        return tuple(
            slice(None) if v is None else slice(np.searchsorted(a, w - reach), np.searchsorted(a, w + reach, "right"))
            for a, w, v in zip(axes, world, centre, strict=True)
        )

    def render(self, axes) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32, before blur/noise) and liver mask on the grid of world `axes` (mm)."""
        hu = self.hu
        (px, py, pz), (qx, qy, qz) = self.frames(axes)
        sx, sy, _ = self.scale
        px2, py2, anterior = px * px, py * py, py > 0

        def ellipse(ax, b_ant, b_post):
            return px2 * (1 / ax**2) + py2 * np.where(anterior, np.float32(1 / b_ant**2), np.float32(1 / b_post**2))

        cav = (125 * sx, 85 * sy, 80 * sy)
        rho = np.sqrt(ellipse(*cav))  # 1 on the inner surface of the abdominal/chest wall
        muscle_out = ellipse(cav[0] + self.wall, cav[1] + self.wall, cav[2] + self.wall + 40)
        body = ellipse(cav[0] + self.wall + self.fat[0], cav[1] + self.wall + self.fat[1],
                       cav[2] + self.wall + 40 + self.fat[2])  # fmt: skip
        zd = self.diaphragm(qx, qy)
        cavity = rho < 1
        thorax = (qz > zd + 3) & (qz < 240) & cavity
        below = (qz < zd - 3) & cavity  # the abdominal cavity

        img = np.full(px.shape, hu["air"], np.float32)
        img[body < 1] = hu["fat"]
        img[muscle_out < 1] = hu["muscle"]
        img[cavity] = hu["fat"]

        # Abdomen below the organs: bowel loops (wall, fluid, gas) in mesenteric fat.
        idx, pts = points_of(below & (qz < -90), qx, qy, qz)
        field = self.bowel_field(*pts.T)
        threshold = np.clip((pts[:, 2] + 150) / 50, 0, 1) * 2.5 - 0.2  # loops fade out towards the upper abdomen
        bowel, lumen = field > threshold, field > threshold + 0.5
        values = np.where(lumen, hu["fluid"] + 10, hu["gut"]).astype(np.float32)
        values[lumen] = np.where(self.gas_field(*pts[lumen].T) > 0.8, hu["gas"], values[lumen])
        img.reshape(-1)[idx[bowel]] = values[bowel]

        def organ(centre, radii, yaw, clip):
            sl = self.window(axes, centre, max(radii))
            return sl, (ellipsoid(qx[sl], qy[sl], qz[sl], centre, radii, yaw) < 1) & clip[sl]

        # Thorax: lungs around the heart and the mediastinum.
        lung = thorax & (rho < 0.97 * np.sqrt(1 - np.clip((qz - 120) / 130, 0, 1) ** 2))  # narrowing to the apex
        idx, pts = points_of(lung, qx, qy, qz)
        img.reshape(-1)[idx] = np.where(self.lung_texture(*pts.T) > 1.6, -450, hu["lung"])  # with pulmonary vessels
        img[thorax & (np.abs(qx + 5) < 28) & (qy > -50)] = hu["fat"]  # mediastinum
        img[(np.abs(qz - zd) <= 3) & cavity] = hu["muscle"]  # diaphragm
        (hx, hy), (hrx, hry, hrz), h_yaw = self.heart[0][:2], self.heart[1], self.heart[2]
        heart_c = (hx, hy, float(self.diaphragm(hx, hy)) + 0.8 * hrz)
        sl, fat = organ(heart_c, (hrx * 1.15, hry * 1.15, hrz * 1.15), h_yaw, thorax)
        img[sl][fat] = hu["fat"]  # pericardial fat
        sl, heart = organ(heart_c, (hrx, hry, hrz), h_yaw, thorax)
        img[sl][heart] = hu["myocardium"]
        sl, blood = organ(heart_c, (hrx - 10, hry - 10, hrz - 10), h_yaw, thorax)
        img[sl][blood] = hu["heart_blood"]

        # Retroperitoneum: psoas, aorta, IVC, pancreas, splenic and portal veins.
        for side in (-1, 1):
            t = np.clip((-120 - qz) / 200, 0, 1)
            psoas = ((qx - side * (25 + 30 * t)) / (8 + 14 * t)) ** 2 + ((qy + 52 - 10 * t) / (8 + 12 * t)) ** 2
            img[(psoas < 1) & (qz < -120) & cavity] = hu["muscle"]
        aorta = ((qx - self.aorta[0]) ** 2 + (qy - self.aorta[1]) ** 2 < self.aorta[2] ** 2) & (qz < 160)
        img[aorta] = hu["aorta"]
        img[self.in_ivc(qx, qy) & (qz < heart_c[2])] = hu["caval"]
        sl = self.window(axes, (-25, -10, -110), 90)
        idx, pts = points_of(below[sl], qx[sl], qy[sl], qz[sl])
        img[sl][scatter(below[sl].shape, idx[capsules(pts, self.pancreas)])] = hu["pancreas"]
        veins = capsules(pts, self.splenic_vein + self.portal_tree[:1])
        img[sl][scatter(below[sl].shape, idx[veins])] = hu["portal"]

        # Abdominal organs; those that press into the liver are cut out of it.
        pressing = aorta | (np.hypot(qx, qy - self.spine_y) < 22)  # the spine column, with a rim
        sl, spleen = organ(*self.spleen, below)
        img[sl][spleen] = hu["spleen"]
        pressing[sl] |= spleen
        for side, (c, r, yaw) in zip((1, -1), self.kidneys, strict=True):
            sl, outer = organ(c, r, yaw, below)
            img[sl][outer] = hu["kidney_cortex"]
            pressing[sl] |= outer
            sl, medulla = organ(c, tuple(x - 7 for x in r), yaw, below)
            img[sl][medulla] = hu["kidney_medulla"]
            sl, sinus = organ((c[0] - side * 14, c[1] + 4, c[2]), (9, 10, r[2] * 0.55), yaw, below)
            img[sl][sinus] = hu["fat"]
        (gx, gy, _), st_r, st_yaw = self.stomach
        st_c = (gx, gy, float(self.diaphragm(gx, gy)) - 0.85 * st_r[2])
        sl, stomach = organ(st_c, st_r, st_yaw, below)
        img[sl][stomach] = hu["gut"]
        pressing[sl] |= stomach
        sl, lumen = organ(st_c, tuple(x - 5 for x in st_r), st_yaw, below)
        img[sl][lumen] = hu["fluid"]
        img[sl][lumen & (qy[sl] > st_c[1] + st_r[1] * (1 - 2 * self.stomach_gas))] = hu["gas"]  # air-fluid level
        if self.has_gallbladder:
            gb_sl, gallbladder = organ(*self.gallbladder, below)
            pressing[gb_sl] |= gallbladder

        # Liver: the label is everything inside its outline (vessels and lesions included),
        # minus what presses into it.
        idx, pts = points_of(below & (rho < 0.985) & (qx > -140) & (qz > -240), qx, qy, qz)
        liver = scatter(img.shape, idx[self.liver_value(pts[:, 0], pts[:, 1], pts[:, 2]) < 1]) & ~pressing
        if self.has_gallbladder:
            img[gb_sl][gallbladder] = hu["bile"]
        img[liver] = self._liver_interior(liver, qx, qy, qz)

        self._paint_bones(img, axes, px, py, qx, qy, qz, rho, sy)
        img[body >= 1] = hu["air"]  # the wall ellipses stay inside the skin
        return img, liver

    def _liver_interior(self, liver, qx, qy, qz) -> np.ndarray:
        hu = self.hu
        _, pts = points_of(liver, qx, qy, qz)
        values = hu["liver"] + self.liver_texture_hu * self.liver_texture(pts[:, 0], pts[:, 1], pts[:, 2])
        values[self.in_ivc(pts[:, 0], pts[:, 1])] = hu["caval"]
        values[capsules(pts, self.hepatic_veins)] = hu["caval"]
        values[capsules(pts, self.portal_tree)] = hu["portal"]
        for c, r, kind, delta in self.lesions:
            d = np.sqrt((((pts - c) / r) ** 2).sum(axis=1))
            if kind == "cyst":
                values[d < 1] = hu["cyst"]
            else:  # soft edge, a touch of rim
                weight = np.clip((1.15 - d) / 0.3, 0, 1)
                values += weight * delta + ((d > 0.8) & (d < 1.05)) * 0.25 * abs(delta) * (self.phase != "native")
        return values.astype(np.float32)

    def _paint_bones(self, img, axes, px, py, qx, qy, qz, rho, sy) -> None:
        hu = self.hu
        # Vertebrae: cancellous body with a cortical rim, discs every 33 mm, posterior arch.
        sl = self.window(axes, (0.0, self.spine_y - 20, None), 60)
        sub, x, y, z = img[sl], qx[sl], qy[sl], qz[sl]
        r_body = np.hypot(x, y - self.spine_y)
        disc = np.mod(z - self.disc_phase, 33) < 7
        sub[(r_body < 19) & ~disc] = hu["cancellous"]
        sub[(r_body >= 16) & (r_body < 19) & ~disc] = hu["cortical"]
        sub[(r_body < 19) & disc] = hu["disc"]
        canal_y = self.spine_y - 33
        r_canal = np.hypot(x, y - canal_y)
        sub[(r_canal < 15) & (r_canal >= 9) & (y < canal_y + 6)] = hu["cortical"] * 0.8
        sub[(np.abs(x) < 5) & (y < canal_y - 10) & (y > canal_y - 38)] = hu["cortical"] * 0.8  # spinous process
        sub[r_canal < 9] = hu["csf"]
        # Ribs: in the wall, sloping down towards the front, above the costal margin; sternum.
        idx = np.flatnonzero((rho >= 1) & (rho < 1 + 11 / (85 * sy)))
        x, y, z = qx.reshape(-1)[idx], qy.reshape(-1)[idx], qz.reshape(-1)[idx]
        ppx, ppy = px.reshape(-1)[idx], py.reshape(-1)[idx]
        sin_t = ppy / np.maximum(np.hypot(ppx, ppy), 1e-3)
        costal = -165 + 105 * np.clip(sin_t, 0, 1) ** 2
        ribs = (np.mod(z + 80 * sin_t - self.rib_phase, 34) < 10) & (z > costal) & (z < 230)
        ribs &= ~((np.abs(x) < 25) & (y > 0))
        flat = img.reshape(-1)
        flat[idx[ribs]] = 0.5 * (hu["cortical"] + hu["cancellous"])
        flat[idx[(np.abs(x) < 14) & (y > 0) & (z > -45) & (z < 230)]] = hu["cancellous"]

    # ---- the scanner

    def acquire(self, hu: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
        """Blur (scanner PSF + partial volume), correlated noise, int16 HU."""
        spacing = np.asarray(spacing, float)
        sigma = np.sqrt((self.psf_mm / 2.355 / spacing) ** 2 + 0.35**2)
        img = ndimage.gaussian_filter(hu, sigma, mode="nearest")
        noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), 0.6, mode="wrap")
        img += noise * (self.noise_hu / max(float(noise.std()), 1e-6))
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    def describe(self) -> dict:
        return {
            "phase": self.phase,
            "liver_hu": round(float(self.hu["liver"]), 1),
            "spleen_hu": round(float(self.hu["spleen"]), 1),
            "lesions": len(self.lesions),
            "fov_cut": self.fov_cut,
            "noise_hu": round(float(self.noise_hu), 1),
        }


# ---------------------------------------------------------------- public API


def _grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"phantom shape must be three sizes >= 2, got {shape}")
    if spacing is None:
        spacing = tuple(FOV_MM / n for n in shape)
    elif np.ndim(spacing) == 0:
        spacing = (float(spacing),) * 3
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"phantom spacing must be positive (one value or three), got {spacing}")
    return shape, spacing


def _affine(shape, spacing) -> np.ndarray:
    """RAS+, field of view centred on world (0, 0, 0)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)]
    return affine


def grid_axes(shape, spacing) -> list[np.ndarray]:
    """World coordinates (mm) of the voxel centres along each axis, as _affine places them."""
    return [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]


def _header(affine, dtype) -> nib.Nifti1Header:
    img = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img.header


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    anatomy, noise = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(anatomy), np.random.default_rng(noise)


def synth(seed: int, shape=(64, 64, 64), spacing=None) -> tuple[V.Volume, V.Volume, dict]:
    """synth_case plus a description of the draw (phase, liver HU, lesions, ...)."""
    shape, spacing = _grid(shape, spacing)
    anatomy_rng, noise_rng = _rngs(seed)
    patient = Patient(anatomy_rng)
    affine = _affine(shape, spacing)
    hu, liver = patient.render(grid_axes(shape, spacing))
    image = patient.acquire(hu, spacing, noise_rng)
    label = liver.astype(np.uint8)
    info = {"seed": int(seed), **patient.describe()}
    info["liver_ml"] = round(float(label.sum()) * float(np.prod(spacing)) / 1000.0, 1)
    return (
        V.Volume(image, affine, header=_header(affine, np.int16)),
        V.Volume(label, affine, header=_header(affine, np.uint8)),
        info,
    )


def synth_case(seed: int, shape=(64, 64, 64), spacing=None) -> tuple[V.Volume, V.Volume]:
    """One phantom: int16 HU image and uint8 liver mask (1 = liver), RAS affine.

    spacing: None (FOV_MM / shape per axis), one number (isotropic) or three (mm).
    """
    image, label, _ = synth(seed, shape, spacing)
    return image, label


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index` of a data set; data sets with different seeds share no case."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_dataset(out_dir, n: int, seed: int = 0, shape=(64, 64, 64), spacing=None,
                  progress: bool = True) -> list[tuple[Path, Path]]:  # fmt: skip
    """n phantoms in the MSD layout (imagesTr/, labelsTr/, dataset.json). Same seed, same bytes.

    Every file is written atomically; dataset.json last, so it only lists complete cases.
    """
    from rich.progress import Progress

    if n < 1:
        raise ValueError(f"need at least one phantom, got n={n}")
    shape, spacing = _grid(shape, spacing)
    out_dir = Path(out_dir)
    for sub in ("imagesTr", "labelsTr"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    pairs, records = [], []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"phantoms {shape[0]}x{shape[1]}x{shape[2]}", total=n)
        for i in range(n):
            name = f"phantom_{i:03d}.nii.gz"
            image, label, info = synth(case_seed(seed, i), shape, spacing)
            image_path = V.save(image.to_nifti(), out_dir / "imagesTr" / name)
            label_path = V.save(label.to_nifti(), out_dir / "labelsTr" / name)
            pairs.append((image_path, label_path))
            records.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            records[-1]["phantom"] = info
            bar.advance(task)
    write_json(
        out_dir / "dataset.json",
        {
            "name": "liverkd-phantoms",
            "description": "Synthetic abdominal CT with liver masks (liverkd.core.synth.phantom)",
            "reference": "liverkd.core.synth.phantom",
            "licence": "CC0",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver"},
            "numTraining": n,
            "numTest": 0,
            "training": records,
            "test": [],
            "phantom": {"seed": int(seed), "shape": list(shape), "spacing": list(spacing)},
        },
    )
    _remove_stale(out_dir, n)
    return pairs


def _remove_stale(out_dir: Path, n: int) -> None:
    """Phantoms left from an earlier, larger run would be read by folder scans (calibration)."""
    for sub in ("imagesTr", "labelsTr"):
        for path in (out_dir / sub).glob("phantom_*.nii.gz"):
            index = path.name[len("phantom_") : -len(".nii.gz")]
            if index.isdigit() and int(index) >= n:
                path.unlink()


# ---------------------------------------------------------------- preview


def preview(cases, out_png, window=(-175.0, 250.0)) -> Path:
    """PNG: per case an axial and a coronal slice through the liver centroid, liver outlined.

    cases: (image Volume, label Volume, title) triples. Shown in radiological convention
    (patient's right on the left of the picture, anterior up / superior up).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from liverkd.core.atomic import atomic_path

    cases = list(cases)
    fig, axes = plt.subplots(2, len(cases), figsize=(3.2 * len(cases), 6.6), squeeze=False)
    for col, (image, label, title) in enumerate(cases):
        img, lab = image.array.astype(np.float32), label.array > 0
        sx, sy, sz = image.spacing
        centre = np.argwhere(lab).mean(axis=0).round().astype(int) if lab.any() else np.array(img.shape) // 2
        views = [
            (img[:, :, centre[2]], lab[:, :, centre[2]], (sx, sy), f"axial z={centre[2]}"),
            (img[:, centre[1], :], lab[:, centre[1], :], (sx, sz), f"coronal y={centre[1]}"),
        ]
        for row, (sl, ml, (da, db), name) in enumerate(views):
            ax = axes[row, col]
            # array [x, other]: transpose so x runs horizontally, then put the patient's right
            # (high x in RAS) on the left of the picture.
            extent = (0, sl.shape[0] * da, 0, sl.shape[1] * db)
            ax.imshow(sl.T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=extent)
            ax.invert_xaxis()
            if ml.any():
                xs = (np.arange(sl.shape[0]) + 0.5) * da
                ys = (np.arange(sl.shape[1]) + 0.5) * db
                ax.contour(xs, ys, ml.T.astype(float), levels=[0.5], colors="#ff3030", linewidths=1.0)
            ax.set_title(f"{title}\n{name}" if row == 0 else name, fontsize=8)
            ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=9, va="center")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def preview_dataset(out_dir, max_cases: int = 4) -> Path:
    """preview.png for a data set written by write_dataset (first few cases)."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "dataset.json").read_text())
    cases = []
    for record in meta["training"][:max_cases]:
        image = V.load(out_dir / record["image"])
        label = V.load(out_dir / record["label"])
        info = record.get("phantom", {})
        name = Path(record["image"]).name.split(".")[0]
        title = f"{name} {info.get('phase', '')} liver {info.get('liver_hu', '')} HU"
        cases.append((image, label, title))
    return preview(cases, out_dir / "preview.png")
