"""The procedural patient: a seeded multi-tissue label map in millimetres (no image, no scanner).

Anatomy frame (mm): x towards the patient's right, y anterior, z superior (RAS, as in nibabel),
z = 0 at the apex of the right diaphragm dome. A Patient is exact at any point, so one seed is
the same anatomy on any grid. It labels organs, vessels, bones, lungs and bowel loops, and
marks the rest of its body cavity `viscera`; body wall, fat, air, table and every HU come from
the same body, appearance and scanner models that a real label map goes through.

What makes it hard: a spleen next to the liver, the heart resting on the dome over the left
lobe, right kidney, stomach and gallbladder pressed against the liver, the IVC grooving it,
liver-shape variation (lobe sizes, a Riedel's lobe, a smooth deformation).
"""

from __future__ import annotations

import numpy as np

from liverkd.core.synth.fields import Lattice, Waves
from liverkd.core.synth.shapes import capsules, ellipsoid, points_of, scatter, softmin
from liverkd.core.synth.tissues import ID

BOX = ((-180.0, -150.0, -480.0), (180.0, 150.0, 300.0))
"""Where a Patient can have any tissue (the anatomy frame); nothing outside."""


class Patient:
    """All random draws for one procedural patient; render() labels any grid."""

    name = "procedural"
    has_humerus = False

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        j = lambda sd=6.0: rng.normal(0, sd)
        self.cavity = (125 * u(0.93, 1.07), 85 * u(0.93, 1.07), 80 * u(0.93, 1.07))  # lateral, anterior, posterior
        self.bowel_field = Lattice(rng, cell_mm=28, box=BOX)

        # Diaphragm domes: right higher than left.
        self.dome_right = (u(50, 70), u(-15, 5), 0.0)
        self.dome_left = (u(-75, -55), u(-15, 5), u(-25, -8))
        self.dome_depth = u(80, 100)

        # Liver: lobes as ellipsoids, blended, then deformed.
        self.liver_lobes = [
            ((62 + j(), -5 + j(), -72 + j(8)), (68 * u(0.85, 1.15), 80 * u(0.85, 1.1), 78 * u(0.85, 1.2)), 0.0),
            ((-5 + j(), 38 + j(), -42 + j()), (u(55, 100), 40 * u(0.8, 1.2), 34 * u(0.8, 1.2)), j(8)),  # left lobe
            ((15 + j(3), -28 + j(3), -55 + j(4)), (22, 22, 32), 0.0),  # caudate
        ]
        self.riedel = bool(u() < 0.2)  # a tongue of the right lobe reaching down
        if self.riedel:
            self.liver_lobes.append(((85 + j(), 10 + j(), -150 + j(10)), (30, 35, u(35, 55)), 0.0))
        self.left_tip = self.liver_lobes[1][0][0] - self.liver_lobes[1][1][0]
        self.liver_warp = Waves(rng, 8, amplitude_mm=u(8, 16), wavelength_mm=(80, 200))

        self.heart = ((-25 + j(), 30 + j(), None), (u(55, 68), u(45, 55), u(48, 58)), u(15, 40))
        self.spleen = ((-92 + j(), -38 + j(), -70 + j(8)), (u(22, 32), u(45, 65), u(40, 58)), u(-45, -25))
        self.stomach = ((-48 + j(), 25 + j(), None), (u(35, 50), u(30, 42), u(45, 60)), u(-20, 20))
        self.kidneys = [
            ((72 + j(4), -42 + j(4), -158 + j(10)), (u(24, 30), u(22, 27), u(46, 58)), u(-30, -10)),
            ((-70 + j(4), -40 + j(4), -140 + j(10)), (u(24, 30), u(22, 27), u(46, 58)), u(10, 30)),
        ]
        self.gallbladder = ((45 + j(), 45 + j(), -118 + j(8)), (u(12, 18), u(12, 18), u(25, 40)), j(20))
        self.has_gallbladder = bool(u() < 0.85)  # else cholecystectomy
        self.aorta = (-14 + j(3), -36 + j(3), u(10, 13))
        self.ivc = (22 + j(3), -30 + j(3), u(9, 13))
        self.spine_y = -60 + j(3)
        self.disc_phase = u(0, 33)
        self.rib_phase = u(0, 34)
        pancreas_tail = np.array([-82.0, -25.0, -95.0]) + rng.normal(0, 5, 3)
        self.pancreas = [(pancreas_tail, (-30, -5, -105), 11), ((-30, -5, -105), (5, 0, -112), 11),
                         ((5, 0, -112), (30, -2, -128), 13)]  # fmt: skip
        hilum = np.array([35.0, 5.0, -92.0]) + rng.normal(0, 4, 3)
        confluence = (10, -8, -118)
        self.portal_veins = [(confluence, pancreas_tail + (0, -8, 0), 5), (confluence, hilum, 8)]  # splenic, portal

    # ---- the source interface (shared with labelmaps.LabelMap)

    centre_xy = (0.0, 0.0)
    coverage_z = (BOX[0][2], BOX[1][2])

    def liver_box(self) -> tuple[np.ndarray, np.ndarray]:
        """World (lo, hi) corners (mm) around the liver, from a coarse 8 mm evaluation."""
        axes = [np.arange(lo, hi, 8.0, dtype=np.float32) for lo, hi in zip((-160, -140, -320), (210, 140, 80))]
        inside = np.argwhere(self.liver_value(*np.meshgrid(*axes, indexing="ij")) < 1)
        lo = [a[i] for a, i in zip(axes, inside.min(axis=0))]
        hi = [a[i] for a, i in zip(axes, inside.max(axis=0))]
        return np.array(lo) - 8.0, np.array(hi) + 8.0

    def crop(self, lo, hi, spacing: float) -> tuple[np.ndarray, np.ndarray]:
        """Tissue ids on a `spacing` grid over the world box [lo, hi] (mm) and its affine."""
        lo = np.maximum(lo, BOX[0])
        hi = np.maximum(np.minimum(hi, BOX[1]), lo + spacing)
        axes = [np.arange(a, b + spacing / 2, spacing, dtype=np.float32) for a, b in zip(lo, hi)]
        affine = np.diag([spacing, spacing, spacing, 1.0])
        affine[:3, 3] = [a[0] for a in axes]
        return self.render(axes), affine

    def describe(self) -> dict:
        return {"anatomy": "procedural", "riedel_lobe": self.riedel, "gallbladder": self.has_gallbladder}

    # ---- geometry

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

    @staticmethod
    def window(axes, centre, radius: float) -> tuple[slice, slice, slice]:
        """Voxel box on the grid `axes` holding a ball of `radius` mm at `centre` (None: whole axis)."""
        return tuple(
            slice(None) if c is None else slice(np.searchsorted(a, c - radius), np.searchsorted(a, c + radius, "right"))
            for a, c in zip(axes, centre, strict=True)
        )

    # ---- rendering

    def render(self, axes) -> np.ndarray:
        """Tissue ids (uint8, tissues.ID) on the grid of 1-D world `axes` (mm)."""
        qx, qy, qz = np.meshgrid(*(np.asarray(a, np.float32) for a in axes), indexing="ij")
        tissue = np.zeros(qx.shape, np.uint8)
        lateral, ant, post = self.cavity
        rho = np.sqrt((qx / lateral) ** 2 + (qy / np.where(qy > 0, np.float32(ant), np.float32(post))) ** 2)
        zd = self.diaphragm(qx, qy)
        cavity = rho < 1
        thorax = (qz > zd + 3) & (qz < 240) & cavity
        below = (qz < zd - 3) & cavity  # the abdominal cavity
        tissue[cavity & (qz < 240)] = ID["viscera"]

        def organ(centre, radii, yaw, clip, name):
            sl = self.window(axes, centre, max(radii))
            mask = (ellipsoid(qx[sl], qy[sl], qz[sl], centre, radii, yaw) < 1) & clip[sl]
            tissue[sl][mask] = ID[name]
            return sl, mask

        # Bowel loops below the organs, fading out towards the upper abdomen.
        idx, pts = points_of(below & (qz < -90), qx, qy, qz)
        threshold = np.clip((pts[:, 2] + 150) / 50, 0, 1) * 2.5 - 0.2
        tissue.reshape(-1)[idx[self.bowel_field(*pts.T) > threshold]] = ID["bowel"]

        # Thorax: lungs narrowing to the apex, mediastinum, diaphragm, heart in pericardial fat.
        tissue[thorax & (rho < 0.97 * np.sqrt(1 - np.clip((qz - 120) / 130, 0, 1) ** 2))] = ID["lung"]
        tissue[thorax & (np.abs(qx + 5) < 28) & (qy > -50)] = ID["fat"]
        tissue[(np.abs(qz - zd) <= 3) & cavity] = ID["muscle"]
        (hx, hy), radii, h_yaw = self.heart[0][:2], self.heart[1], self.heart[2]
        heart_c = (hx, hy, float(self.diaphragm(hx, hy)) + 0.8 * radii[2])
        organ(heart_c, tuple(r * 1.15 for r in radii), h_yaw, thorax, "fat")
        organ(heart_c, radii, h_yaw, thorax, "heart")

        # Retroperitoneum: psoas, aorta, IVC, pancreas, splenic and portal veins.
        for side in (-1, 1):
            t = np.clip((-120 - qz) / 200, 0, 1)
            psoas = ((qx - side * (25 + 30 * t)) / (8 + 14 * t)) ** 2 + ((qy + 52 - 10 * t) / (8 + 12 * t)) ** 2
            tissue[(psoas < 1) & (qz < -120) & cavity] = ID["muscle"]
        aorta = ((qx - self.aorta[0]) ** 2 + (qy - self.aorta[1]) ** 2 < self.aorta[2] ** 2) & (qz < 160)
        tissue[aorta] = ID["artery"]
        ivc = self.in_ivc(qx, qy) & (qz < heart_c[2])
        tissue[ivc] = ID["vein"]
        sl = self.window(axes, (-25, -10, -110), 90)
        idx, pts = points_of(below[sl], qx[sl], qy[sl], qz[sl])
        tissue[sl][scatter(below[sl].shape, idx[capsules(pts, self.pancreas)])] = ID["pancreas"]
        tissue[sl][scatter(below[sl].shape, idx[capsules(pts, self.portal_veins)])] = ID["portal"]

        # Abdominal organs; those that press into the liver are cut out of it.
        pressing = aorta | ivc | (np.hypot(qx, qy - self.spine_y) < 22)  # the spine column, with a rim
        sl, spleen = organ(*self.spleen, below, "spleen")
        pressing[sl] |= spleen
        for side, (c, r, yaw) in zip((1, -1), self.kidneys, strict=True):
            sl, kidney = organ(c, r, yaw, below, "kidney")
            pressing[sl] |= kidney
            organ((c[0] - side * 14, c[1] + 4, c[2]), (9, 10, r[2] * 0.55), yaw, below, "fat")  # renal sinus
        (gx, gy, _), st_r, st_yaw = self.stomach
        sl, stomach = organ((gx, gy, float(self.diaphragm(gx, gy)) - 0.85 * st_r[2]), st_r, st_yaw, below, "stomach")
        pressing[sl] |= stomach
        if self.has_gallbladder:
            sl, gallbladder = organ(*self.gallbladder, below, "gallbladder")
            pressing[sl] |= gallbladder

        # Liver: everything inside its outline, minus what presses into it.
        idx, pts = points_of(below & (rho < 0.985) & (qx > -140) & (qz > -240), qx, qy, qz)
        liver = scatter(tissue.shape, idx[self.liver_value(pts[:, 0], pts[:, 1], pts[:, 2]) < 1]) & ~pressing
        tissue[liver] = ID["liver"]
        self._paint_bones(tissue, axes, qx, qy, qz, rho)
        return tissue

    def _paint_bones(self, tissue, axes, qx, qy, qz, rho) -> None:
        # Vertebrae: cancellous body with a cortical rim, discs every 33 mm, posterior arch, canal.
        sl = self.window(axes, (0.0, self.spine_y - 20, None), 60)
        sub, x, y, z = tissue[sl], qx[sl], qy[sl], qz[sl]
        r_body = np.hypot(x, y - self.spine_y)
        disc = np.mod(z - self.disc_phase, 33) < 7
        sub[(r_body < 19) & ~disc] = ID["cancellous"]
        sub[(r_body >= 16) & (r_body < 19) & ~disc] = ID["cortical"]
        sub[(r_body < 19) & disc] = ID["cartilage"]
        canal_y = self.spine_y - 33
        r_canal = np.hypot(x, y - canal_y)
        sub[(r_canal < 15) & (r_canal >= 9) & (y < canal_y + 6)] = ID["cortical"]
        sub[(np.abs(x) < 5) & (y < canal_y - 10) & (y > canal_y - 38)] = ID["cortical"]  # spinous process
        sub[r_canal < 9] = ID["neural"]
        # Ribs: just outside the cavity, sloping down towards the front, above the costal margin; sternum.
        idx = np.flatnonzero((rho >= 1) & (rho < 1 + 11 / self.cavity[1]))
        x, y, z = qx.reshape(-1)[idx], qy.reshape(-1)[idx], qz.reshape(-1)[idx]
        sin_t = y / np.maximum(np.hypot(x, y), 1e-3)
        costal = -165 + 105 * np.clip(sin_t, 0, 1) ** 2
        ribs = (np.mod(z + 80 * sin_t - self.rib_phase, 34) < 10) & (z > costal) & (z < 230)
        ribs &= ~((np.abs(x) < 25) & (y > 0))
        flat = tissue.reshape(-1)
        flat[idx[ribs]] = ID["cortical"]
        flat[idx[(np.abs(x) < 14) & (y > 0) & (z > -45) & (z < 230)]] = ID["cancellous"]
