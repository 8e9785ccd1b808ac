"""Synthetic spine phantoms for the virtual treatment room.

Each phantom is an analytic model -- ellipsoids, elliptic cylinders, capsules
and boxes painted one over the other -- sampled with partial-volume
supersampling onto two independent grids:

- ``anatomy``: a fine "truth" grid in HU *without* seeds, which the kV
  simulator projects (the seeds are added to the frames analytically);
- ``planning_ct``: a coarser clinical grid with a different voxel size and a
  sub-voxel origin offset, sampled from the analytic model (not resampled
  from the truth grid, which would be the inverse crime), with the seeds burnt
  in as clipped 3071 HU blobs, mild metal streaks and CT noise.

The model frame is the patient's LPS axes (+x left, +y posterior, +z
superior) with the origin at the target vertebra's body centre; the CT's LPS
coordinates are the model coordinates plus a fixed scanner offset, so the
isocentre has realistic, non-zero LPS coordinates. Patient position HFS.

HU values (see ``docs/VIRTUAL_ROOM.md``): cortical bone 1700 (vertebral body
shell) / 1400 (posterior elements, ribs), cancellous bone 250, discs 80,
soft tissue 40, muscle 50, fat -100, lung -800, air -1000, thermoplastic
mask 150, couch foam -850 with carbon-fibre skins 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import numpy as np
from scipy.spatial.transform import Rotation

from spineguide.calibration.foundation import checked_number
from spineguide.calibration.foundation import readonly_array as _ro
from spineguide.registration.attenuation import linear_attenuation_per_mm
from spineguide.registration.volume import CTVolume, PatientPosition

from ..errors import VirtualPhantomError
from ._shapes import Box, Capsule, Cylinder, Ellipsoid, EllipticCylinder, Layer, voxelise

__all__ = [
    "SeedShape",
    "Seed",
    "Phantom",
    "HU",
    "thoracolumbar_phantom",
    "cervical_phantom",
    "PLANNING_SEED_HU",
    "THORACOLUMBAR_MODEL_ORIGIN_LPS_MM",
    "CERVICAL_MODEL_ORIGIN_LPS_MM",
]


#: Tissue values of the phantoms, HU.
HU: Mapping[str, float] = MappingProxyType(
    {
        "air": -1000.0,
        "lung": -800.0,
        "fat": -100.0,
        "soft_tissue": 40.0,
        "muscle": 50.0,
        "csf": 15.0,
        "brain": 35.0,
        "disc": 80.0,
        "cancellous": 250.0,
        "cortical_body": 1700.0,
        "cortical_posterior": 1400.0,
        "mastoid": 800.0,
        "teeth": 2200.0,
        "mask": 150.0,
        "headrest": -300.0,
        "couch_foam": -850.0,
        "couch_skin": 400.0,
    }
)

#: Value of the seeds burnt into the planning CT (top of the 12-bit HU range).
PLANNING_SEED_HU = 3071.0
_CORTEX_MM = 1.3  # cortical shell thickness of vertebral bodies and processes
# Energy at which the seeds' CT number is taken (gold's K edge forbids the CT's 70 keV in the table); any
# value gives ~1e5 HU, far above the 3071 HU clip, so a voxel a seed fills even 1% of saturates.
_SEED_CT_ENERGY_KEV = 60.0

#: Model origin (the L1 / C4 body centre before the seeded jitter) in the planning CT's LPS frame, mm.
THORACOLUMBAR_MODEL_ORIGIN_LPS_MM = np.array([1.7, 22.4, -385.3])
CERVICAL_MODEL_ORIGIN_LPS_MM = np.array([-0.8, 31.6, -121.9])
THORACOLUMBAR_MODEL_ORIGIN_LPS_MM.setflags(write=False)
CERVICAL_MODEL_ORIGIN_LPS_MM.setflags(write=False)


class SeedShape(Enum):
    """Implanted marker shapes."""

    CYLINDER = "cylinder"
    SPHERE = "sphere"


@dataclass(frozen=True, slots=True)
class Seed:
    """An implanted gold marker in the planning CT frame.

    Attributes
    ----------
    name : str
    centre_lps_mm : (3,) array
        Centre, planning-CT LPS, mm.
    axis_lps : (3,) unit vector
        Cylinder axis in LPS (ignored for spheres, stored as given).
    length_mm, diameter_mm : float
        Cylinder length and diameter; a sphere has ``length_mm == diameter_mm``.
    shape : SeedShape
    material : str
        Key of :data:`spineguide.registration.attenuation.MATERIALS` (``"gold"``).
    """

    name: str
    centre_lps_mm: np.ndarray
    axis_lps: np.ndarray
    length_mm: float
    diameter_mm: float
    shape: SeedShape = SeedShape.CYLINDER
    material: str = "gold"

    def __post_init__(self) -> None:
        c = np.array(self.centre_lps_mm, dtype=np.float64)
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            raise VirtualPhantomError(f"seed {self.name!r}: centre_lps_mm must be 3 finite numbers, got {c.tolist()}")
        a = np.array(self.axis_lps, dtype=np.float64)
        n = float(np.linalg.norm(a)) if a.shape == (3,) else 0.0
        if a.shape != (3,) or not math.isfinite(n) or n < 1e-9:
            raise VirtualPhantomError(f"seed {self.name!r}: axis_lps must be a non-zero 3-vector, got {a.tolist()}")
        shape = SeedShape(self.shape)
        for what in ("length_mm", "diameter_mm"):
            v = checked_number(getattr(self, what), VirtualPhantomError,
                               f"seed {self.name!r}: {what} must be positive, got {getattr(self, what)}", minimum=0.0,
                               exclusive_minimum=True)
            object.__setattr__(self, what, v)
        if shape is SeedShape.SPHERE and self.length_mm != self.diameter_mm:
            raise VirtualPhantomError(
                f"seed {self.name!r}: a sphere has length_mm == diameter_mm, got {self.length_mm} and {self.diameter_mm}"
            )
        object.__setattr__(self, "centre_lps_mm", _ro(c))
        object.__setattr__(self, "axis_lps", _ro(a / n))
        object.__setattr__(self, "shape", shape)

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0

    def endpoints_lps_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres of the two end caps (LPS mm); equal to the centre for a sphere."""
        half = 0.0 if self.shape is SeedShape.SPHERE else self.length_mm / 2.0
        return self.centre_lps_mm - half * self.axis_lps, self.centre_lps_mm + half * self.axis_lps

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "centre_lps_mm": self.centre_lps_mm.tolist(),
            "axis_lps": self.axis_lps.tolist(),
            "length_mm": self.length_mm,
            "diameter_mm": self.diameter_mm,
            "shape": self.shape.value,
            "material": self.material,
        }


@dataclass(frozen=True, slots=True)
class Phantom:
    """A synthetic patient: truth anatomy, planning CT, labels, seeds.

    Attributes
    ----------
    name : str
        ``"thoracolumbar"`` or ``"cervical"``.
    anatomy : CTVolume
        HU without seeds on the fine truth grid (LPS, HFS); what the kV
        simulator projects.
    planning_ct : CTVolume
        The clinical CT (coarser, differently placed grid) with seeds burnt in.
    isocentre_lps_mm : (3,) array
        Plan isocentre (centre of the target vertebral body), planning-CT LPS, mm.
    labels : (nk, nj, ni) uint8 array
        Vertebra labels on the planning-CT grid (0 = not vertebra).
    label_names : mapping int -> str
        ``{1: "T9", ...}``.
    target_label : int
        Label of the target vertebra.
    seeds : tuple of Seed
    """

    name: str
    anatomy: CTVolume
    planning_ct: CTVolume
    isocentre_lps_mm: np.ndarray
    labels: np.ndarray
    label_names: Mapping[int, str]
    target_label: int
    seeds: tuple[Seed, ...]

    def __post_init__(self) -> None:
        iso = np.array(self.isocentre_lps_mm, dtype=np.float64)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise VirtualPhantomError(f"phantom {self.name!r}: isocentre_lps_mm must be 3 finite numbers")
        labels = np.array(self.labels, dtype=np.uint8)
        if labels.shape != self.planning_ct.hu.shape:
            raise VirtualPhantomError(
                f"phantom {self.name!r}: labels shape {labels.shape} differs from the planning CT {self.planning_ct.hu.shape}"
            )
        labels.setflags(write=False)
        names = MappingProxyType({int(k): str(v) for k, v in dict(self.label_names).items()})
        if self.target_label not in names:
            raise VirtualPhantomError(f"phantom {self.name!r}: target label {self.target_label} has no name")
        object.__setattr__(self, "isocentre_lps_mm", _ro(iso))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @property
    def target_name(self) -> str:
        return self.label_names[self.target_label]

    def seeds_room_mm(self) -> np.ndarray:
        """Seed centres in the room at perfect setup, (N, 3) mm (empty (0, 3) without seeds)."""
        if not self.seeds:
            return np.zeros((0, 3))
        pts = np.stack([s.centre_lps_mm for s in self.seeds])
        return self.planning_ct.lps_to_room(pts, self.isocentre_lps_mm)

    def target_mask(self) -> np.ndarray:
        """uint8 mask (1 = target vertebra) on the planning-CT grid."""
        return (self.labels == self.target_label).astype(np.uint8)


# ----------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class _Level:
    name: str
    height_mm: float  # vertebral body height
    half_width_mm: float  # body LR semi-axis
    half_depth_mm: float  # body AP semi-axis
    disc_below_mm: float
    spinous_len_mm: float
    transverse_len_mm: float
    region: str  # "cervical", "thoracic", "lumbar"


def _euler(deg_xyz) -> np.ndarray:
    return Rotation.from_euler("xyz", deg_xyz, degrees=True).as_matrix()


class _Vertebra:
    """Places vertebra-local points (LPS axes, origin at the body centre) in the model frame."""

    def __init__(self, level: _Level, centre: np.ndarray, rotation: np.ndarray, label: int, rng) -> None:
        self.level, self.c, self.r, self.label = level, centre, rotation, label
        # Per-level asymmetry: left/right transverse processes and spinous tilt differ.
        self.tp_scale = 1.0 + rng.uniform(-0.12, 0.12, size=2)
        self.sp_tilt_mm = rng.uniform(-2.5, 2.5)

    def p(self, local) -> np.ndarray:
        return self.c + self.r @ np.asarray(local, dtype=np.float64)

    def bone_capsule(self, a, b, r0, r1=None, hu_cortex=HU["cortical_posterior"]) -> list[Layer]:
        r1 = r0 if r1 is None else r1
        return [
            Layer(Capsule(self.p(a), self.p(b), r0, r1), hu_cortex, self.label),
            Layer(Capsule(self.p(a), self.p(b), max(r0 - _CORTEX_MM, 0.5), max(r1 - _CORTEX_MM, 0.5)), HU["cancellous"], self.label),
        ]

    def layers(self) -> list[Layer]:
        lv = self.level
        a, b, h = lv.half_width_mm, lv.half_depth_mm, lv.height_mm
        out: list[Layer] = []
        if lv.name != "C1":
            out.append(Layer(EllipticCylinder(self.c, a, b, h / 2, self.r), HU["cortical_body"], self.label))
            out.append(
                Layer(
                    EllipticCylinder(self.c, a - _CORTEX_MM, b - _CORTEX_MM, h / 2 - _CORTEX_MM, self.r),
                    HU["cancellous"],
                    self.label,
                )
            )
        scale = {"cervical": 0.55, "thoracic": 0.85, "lumbar": 1.0}[lv.region]
        pr = 4.5 * scale + 0.8  # pedicle radius
        px = a * 0.62
        canal_y = b + 9.0 * scale + 2.0
        if lv.name == "C1":
            # Atlas: anterior arch, lateral masses and posterior arch as a ring of capsules.
            ring = [(0.0, -b - 2.0), (a * 0.9, -b + 2.0), (a * 1.5, 4.0), (a * 1.3, canal_y + 4.0), (0.0, canal_y + 10.0)]
            pts = ring + [(-x, y) for x, y in reversed(ring[:-1])]
            for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
                out += self.bone_capsule((x0, y0, 0.0), (x1, y1, 0.0), 3.8)
            for s in (-1, 1):
                out.append(Layer(Ellipsoid(self.p((s * a * 1.35, 1.0, 0.0)), (6.5, 8.0, 6.5), self.r), HU["cortical_posterior"], self.label))
            return out
        if lv.name == "C2":
            out += self.bone_capsule((0.0, -1.0, h / 2 - 2.0), (0.0, -1.5, h / 2 + 13.0), 5.0, 4.2, HU["cortical_body"])
        for s, tps in ((-1.0, self.tp_scale[0]), (1.0, self.tp_scale[1])):
            # pedicle, lamina, transverse process, articular processes
            ped_a, ped_b = (s * px, b * 0.7, 1.0), (s * (px + 1.5), canal_y + 3.0, 1.0)
            out += self.bone_capsule(ped_a, ped_b, pr)
            out += self.bone_capsule(ped_b, (0.0, canal_y + 10.0 * scale + 4.0, -2.0), 3.0 * scale + 1.0)
            tp_len = lv.transverse_len_mm * tps
            if lv.region == "thoracic":
                tp_end = (s * (px + 2 + tp_len * 0.85), canal_y + 4.0 + tp_len * 0.5, 3.0)
                out += self.bone_capsule(ped_b, tp_end, 4.5, 3.6)
            else:
                tp_end = (s * (px + 2 + tp_len), canal_y - 1.0, 0.0)
                out += self.bone_capsule(ped_b, tp_end, 3.6 * scale + 0.6, 2.6 * scale + 0.6)
            out += self.bone_capsule((s * (px + 2.0), canal_y + 4.0, h / 2 - 2.0), (s * (px + 3.0), canal_y + 5.0, h / 2 + 5.0), 3.2 * scale + 0.5)
            out += self.bone_capsule((s * px * 0.8, canal_y + 8.0, -h / 2 + 2.0), (s * px * 0.8, canal_y + 9.0, -h / 2 - 5.0), 3.2 * scale + 0.5)
        sp0 = (0.0, canal_y + 10.0 * scale + 3.0, -2.0)
        sp_len = lv.spinous_len_mm
        if lv.region == "lumbar":
            centre = self.p((self.sp_tilt_mm * 0.3, sp0[1] + sp_len / 2, -3.0))
            rot = self.r @ _euler((-8.0, 0.0, self.sp_tilt_mm))
            out.append(Layer(Box(centre, (3.2, sp_len / 2, 8.5), rot), HU["cortical_posterior"], self.label))
            out.append(Layer(Box(centre, (3.2 - _CORTEX_MM, sp_len / 2 - _CORTEX_MM, 8.5 - _CORTEX_MM), rot), HU["cancellous"], self.label))
        else:
            drop = 0.55 * sp_len if lv.region == "thoracic" else 0.25 * sp_len
            tip = (self.sp_tilt_mm, sp0[1] + sp_len, sp0[2] - drop)
            out += self.bone_capsule(sp0, tip, 4.2 * scale + 0.8, 3.0 * scale + 0.8)
        return out

    def canal_layer(self) -> Layer:
        lv = self.level
        scale = {"cervical": 0.55, "thoracic": 0.85, "lumbar": 1.0}[lv.region]
        canal_y = lv.half_depth_mm + 9.0 * scale + 2.0
        half = lv.height_mm / 2 + lv.disc_below_mm + 1.0
        return Layer(
            EllipticCylinder(self.p((0.0, canal_y + 1.0, 0.0)), 11.0 * scale + 1.5, 8.0 * scale + 1.5, half, self.r),
            HU["csf"],
            0,
        )

    def rib_layers(self, trunk_centre_y: float, trunk_rx: float, trunk_ry: float, sweep_rad: float, rng) -> list[Layer]:
        """A pair of ribs from the transverse processes around the trunk wall, sloping down anteriorly."""
        lv = self.level
        out: list[Layer] = []
        canal_y = lv.half_depth_mm + 9.0 * 0.85 + 2.0
        for s in (-1.0, 1.0):
            sweep = sweep_rad * (1.0 + rng.uniform(-0.08, 0.08))
            head = self.p((s * (lv.half_width_mm + 1.0), lv.half_depth_mm * 0.5, 2.0))
            tubercle = self.p((s * (lv.half_width_mm * 0.62 + 2 + lv.transverse_len_mm * 0.8), canal_y + 3.0 + lv.transverse_len_mm * 0.45, 3.0))
            pts = [head, tubercle]
            theta0 = math.atan2(abs(tubercle[0]), tubercle[1] - trunk_centre_y)
            n = 9
            for i in range(1, n + 1):
                th = theta0 + sweep * i / n
                x = s * trunk_rx * math.sin(th)
                y = trunk_centre_y + trunk_ry * math.cos(th)
                z = tubercle[2] - 28.0 * (th - theta0) / max(sweep, 1e-6) * (sweep / 2.0)
                pts.append(np.array([x, y, z]))
            for p0, p1 in zip(pts[:-1], pts[1:]):
                out.append(Layer(Capsule(p0, p1, 4.2), HU["cortical_posterior"], None))
                out.append(Layer(Capsule(p0, p1, 4.2 - _CORTEX_MM), HU["cancellous"], None))
        return out


def _spine(
    levels: Sequence[_Level], target: str, anchor: str, lordosis_mm_per_mm2: float, rng
) -> tuple[list[_Vertebra], list[Layer]]:
    """Stack vertebrae top to bottom with the anchor level's body centre at the model origin; discs in between."""
    names = [lv.name for lv in levels]
    if target not in names:
        raise VirtualPhantomError(f"target vertebra {target!r} is not in this phantom (levels: {', '.join(names)})")
    z = [0.0]
    for upper, lower in zip(levels[:-1], levels[1:]):
        z.append(z[-1] - (upper.height_mm / 2 + upper.disc_below_mm + lower.height_mm / 2))
    z = np.array(z) - z[names.index(anchor)]
    verts = []
    for idx, (lv, zc) in enumerate(zip(levels, z)):
        jitter = rng.normal(0.0, 1.0, size=5)
        centre = np.array([0.9 * jitter[0], lordosis_mm_per_mm2 * zc**2 + 0.6 * jitter[1], zc])
        pitch = math.degrees(math.atan(2 * lordosis_mm_per_mm2 * zc))
        rot = _euler((pitch + 1.5 * jitter[2], 1.5 * jitter[3], 2.5 * jitter[4]))
        verts.append(_Vertebra(lv, centre, rot, idx + 1, rng))
    discs = []
    for upper, lower in zip(verts[:-1], verts[1:]):
        if upper.level.name == "C1":
            continue
        top = upper.p((0, 0, -upper.level.height_mm / 2))
        bot = lower.p((0, 0, lower.level.height_mm / 2))
        mid = (top + bot) / 2
        half = float(np.linalg.norm(top - bot)) / 2 + 0.8
        a = (upper.level.half_width_mm + lower.level.half_width_mm) / 2 - 0.6
        b = (upper.level.half_depth_mm + lower.level.half_depth_mm) / 2 - 0.6
        discs.append(Layer(EllipticCylinder(mid, a, b, half, lower.r), HU["disc"], None))
    return verts, discs


_THORACOLUMBAR_LEVELS = (
    _Level("T9", 20.0, 16.5, 13.0, 6.0, 40.0, 14.0, "thoracic"),
    _Level("T10", 21.0, 17.0, 13.5, 6.5, 38.0, 13.0, "thoracic"),
    _Level("T11", 22.5, 18.0, 14.0, 7.0, 34.0, 10.0, "thoracic"),
    _Level("T12", 24.0, 19.5, 14.5, 8.0, 30.0, 8.0, "thoracic"),
    _Level("L1", 25.5, 21.0, 15.5, 9.0, 28.0, 17.0, "lumbar"),
    _Level("L2", 26.5, 22.0, 16.0, 9.5, 29.0, 21.0, "lumbar"),
    _Level("L3", 27.0, 23.0, 16.5, 10.0, 30.0, 25.0, "lumbar"),
    _Level("L4", 27.0, 24.0, 17.0, 10.0, 28.0, 21.0, "lumbar"),
)

_CERVICAL_LEVELS = (
    _Level("C1", 10.0, 11.0, 8.0, 2.0, 0.0, 0.0, "cervical"),
    _Level("C2", 14.0, 9.5, 8.0, 4.0, 22.0, 6.0, "cervical"),
    _Level("C3", 12.5, 9.0, 7.5, 4.5, 16.0, 6.0, "cervical"),
    _Level("C4", 12.5, 9.5, 7.5, 4.5, 17.0, 6.5, "cervical"),
    _Level("C5", 13.0, 10.0, 7.8, 5.0, 18.0, 6.5, "cervical"),
    _Level("C6", 13.0, 10.5, 8.0, 5.0, 22.0, 7.0, "cervical"),
    _Level("C7", 14.0, 11.5, 8.5, 5.5, 30.0, 9.0, "cervical"),
    _Level("T1", 15.0, 13.0, 10.0, 5.5, 32.0, 12.0, "thoracic"),
)


def _thoracolumbar_model(target: str, rng) -> tuple[list[Layer], list[_Vertebra]]:
    big = 400.0
    trunk_y, trunk_rx, trunk_ry = -15.0, 165.0, 118.0
    layers = [
        Layer(Box((0.0, 122.0, 0.0), (300.0, 8.0, big)), HU["couch_skin"]),
        Layer(Box((0.0, 122.0, 0.0), (300.0, 6.5, big)), HU["couch_foam"]),
        Layer(EllipticCylinder((0.0, trunk_y, 0.0), trunk_rx, trunk_ry, big), HU["fat"]),
        Layer(EllipticCylinder((0.0, trunk_y, 0.0), trunk_rx - 14.0, trunk_ry - 12.0, big), HU["soft_tissue"]),
    ]
    for s in (-1, 1):
        layers.append(Layer(Ellipsoid((s * 80.0, 2.0, 165.0), (62.0, 78.0, 135.0)), HU["lung"]))
    # Gas pockets in the bowel: seeded, anterior, below the lungs.
    for _ in range(5):
        c = (rng.uniform(-90, 90), rng.uniform(-110, -45), rng.uniform(-130, -20))
        layers.append(Layer(Ellipsoid(c, rng.uniform(6, 18, size=3)), -900.0))
    for s in (-1, 1):
        layers.append(Layer(EllipticCylinder((s * 32.0, 62.0, 0.0), 24.0, 22.0, big), HU["muscle"]))
    verts, discs = _spine(_THORACOLUMBAR_LEVELS, target, "L1", -0.0006, rng)
    layers += discs
    sweeps = {"T9": 1.9, "T10": 1.75, "T11": 1.3, "T12": 0.85}
    for v in verts:
        layers += v.layers()
        if v.level.name in sweeps:
            layers += v.rib_layers(trunk_y, trunk_rx - 22.0, trunk_ry - 18.0, sweeps[v.level.name], rng)
    layers += [v.canal_layer() for v in verts]
    return layers, verts


def _cervical_model(target: str, rng) -> tuple[list[Layer], list[_Vertebra]]:
    big = 400.0
    layers = [
        # Couch and head rest under the (supine) patient: posterior is +y.
        Layer(Box((0.0, 128.0, 0.0), (300.0, 8.0, big)), HU["couch_skin"]),
        Layer(Box((0.0, 128.0, 0.0), (300.0, 6.5, big)), HU["couch_foam"]),
        Layer(Box((0.0, 108.0, 120.0), (60.0, 12.0, 75.0)), HU["headrest"]),
        Layer(Ellipsoid((0.0, 88.0, 20.0), (50.0, 32.0, 45.0)), HU["headrest"]),
        # Thermoplastic mask: anterior shells over head and neck (2.5 mm), air gap inside.
        Layer(Ellipsoid((0.0, -8.0, 112.0), (86.0, 108.0, 118.0), clip_below_y=30.0), HU["mask"]),
        Layer(Ellipsoid((0.0, -8.0, 112.0), (83.5, 105.5, 115.5), clip_below_y=30.0), HU["air"]),
        Layer(EllipticCylinder((0.0, -5.0, -60.0), 74.0, 70.0, 95.0, clip_below_y=20.0), HU["mask"]),
        Layer(EllipticCylinder((0.0, -5.0, -60.0), 71.5, 67.5, 95.0, clip_below_y=20.0), HU["air"]),
        # Shoulders and neck.
        Layer(Ellipsoid((-115.0, 15.0, -140.0), (75.0, 62.0, 70.0)), HU["soft_tissue"]),
        Layer(Ellipsoid((115.0, 15.0, -140.0), (75.0, 62.0, 70.0)), HU["soft_tissue"]),
        Layer(EllipticCylinder((0.0, -5.0, -40.0), 64.0, 60.0, 140.0), HU["fat"]),
        Layer(EllipticCylinder((0.0, -5.0, -40.0), 58.0, 55.0, 140.0), HU["soft_tissue"]),
        Layer(EllipticCylinder((0.0, 35.0, -40.0), 28.0, 22.0, 140.0), HU["muscle"]),
        # Head: scalp, face, skull, brain, skull base, mastoids, occipital protuberance.
        Layer(Ellipsoid((0.0, 0.0, 140.0), (78.0, 98.0, 86.0)), HU["soft_tissue"]),
        Layer(Ellipsoid((0.0, -52.0, 85.0), (52.0, 45.0, 62.0)), HU["soft_tissue"]),
        Layer(Ellipsoid((0.0, 0.0, 140.0), (72.0, 92.0, 80.0)), HU["cortical_body"]),
        Layer(Ellipsoid((0.0, 0.0, 140.0), (65.0, 85.0, 73.0)), HU["brain"]),
        Layer(Ellipsoid((0.0, 8.0, 76.0), (50.0, 42.0, 9.0)), 1200.0),
        Layer(Ellipsoid((0.0, 62.0, 92.0), (30.0, 14.0, 18.0)), HU["cortical_posterior"]),
        Layer(Ellipsoid((-50.0, 16.0, 74.0), (10.0, 12.0, 16.0)), HU["mastoid"]),
        Layer(Ellipsoid((52.0, 14.0, 75.0), (10.0, 12.0, 15.0)), HU["mastoid"]),
        # Airway: nasopharynx to trachea, in front of the vertebral bodies.
        Layer(EllipticCylinder((0.0, -24.0, -35.0), 9.0, 7.0, 105.0), HU["air"]),
        Layer(Ellipsoid((0.0, -38.0, 76.0), (14.0, 16.0, 14.0)), HU["air"]),
    ]
    # Mandible (U-shaped body, rami up to the skull base) and teeth.
    arc = [(45.0 * math.cos(t), -8.0 - 62.0 * math.sin(t)) for t in np.linspace(0.05, math.pi - 0.05, 9)]
    for (x0, y0), (x1, y1) in zip(arc[:-1], arc[1:]):
        for r, hu in ((5.5, HU["cortical_posterior"]), (5.5 - _CORTEX_MM, HU["cancellous"])):
            layers.append(Layer(Capsule((x0, y0, 42.0), (x1, y1, 40.0), r), hu))
    for s in (-1.0, 1.0):
        for r, hu in ((5.0, HU["cortical_posterior"]), (5.0 - _CORTEX_MM, HU["cancellous"])):
            layers.append(Layer(Capsule((s * 45.0, -6.0, 42.0), (s * 47.0, 4.0, 72.0), r), hu))
    teeth = [(38.0 * math.cos(t), -14.0 - 52.0 * math.sin(t)) for t in np.linspace(0.25, math.pi - 0.25, 8)]
    for (x0, y0), (x1, y1) in zip(teeth[:-1], teeth[1:]):
        layers.append(Layer(Capsule((x0, y0, 52.0), (x1, y1, 52.0), 3.5), HU["teeth"]))
        layers.append(Layer(Capsule((x0, y0, 60.0), (x1, y1, 60.0), 3.5), HU["teeth"]))
    for s in (-1.0, 1.0):
        for r, hu in ((5.5, HU["cortical_posterior"]), (5.5 - _CORTEX_MM, HU["cancellous"])):
            layers.append(Layer(Capsule((s * 22.0, -48.0, -92.0), (s * 135.0, -5.0, -80.0), r), hu))
    verts, discs = _spine(_CERVICAL_LEVELS, target, "C4", 0.0012, rng)
    layers += discs
    for v in verts:
        layers += v.layers()
        if v.level.name == "T1":
            layers += v.rib_layers(-5.0, 52.0, 50.0, 1.2, rng)
    layers += [v.canal_layer() for v in verts]
    # Foramen magnum: the cord leaves the skull through the skull base.
    layers.append(Layer(Capsule(verts[0].p((0.0, 12.0, 0.0)), (0.0, 14.0, 100.0), 9.0), HU["csf"], 0))
    return layers, verts


# ----------------------------------------------------------------------------- grids
def _grid(lo_mm: np.ndarray, hi_mm: np.ndarray, spacing: np.ndarray, offset_mm: np.ndarray):
    n = np.maximum(np.floor((hi_mm - lo_mm) / spacing).astype(int), 1)
    first = lo_mm + offset_mm
    return (int(n[2]), int(n[1]), int(n[0])), first


def _spacing3(value, what: str) -> np.ndarray:
    s = np.array(value, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(3, float(s))
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise VirtualPhantomError(f"{what} must be one or three positive numbers (mm), got {np.asarray(value).tolist()}")
    if np.any(s > 8.0):
        raise VirtualPhantomError(f"{what} must be at most 8 mm per axis to resolve vertebrae, got {s.tolist()}")
    return s


def _seed_layers(seeds_model: list[tuple[Seed, np.ndarray]]) -> list[Layer]:
    """Seeds at gold's true CT number; clipping the CT at 3071 HU later saturates every voxel they touch."""
    layers = []
    for seed, c in seeds_model:
        gold_hu = 1000.0 * (linear_attenuation_per_mm(seed.material, _SEED_CT_ENERGY_KEV) / linear_attenuation_per_mm("water", _SEED_CT_ENERGY_KEV) - 1.0)
        if seed.shape is SeedShape.SPHERE:
            shape = Ellipsoid(c, (seed.radius_mm,) * 3)
        else:
            half = seed.length_mm / 2
            shape = Cylinder(c - half * seed.axis_lps, c + half * seed.axis_lps, seed.radius_mm)
        layers.append(Layer(shape, gold_hu))
    return layers


def _streaks(hu: np.ndarray, first: np.ndarray, sp: np.ndarray, seeds_model, amplitude_hu: float) -> None:
    """Mild metal streaks: an alternating radial pattern in the axial slices through each seed."""
    nk, nj, ni = hu.shape
    xs = first[0] + sp[0] * np.arange(ni)
    ys = first[1] + sp[1] * np.arange(nj)
    zs = first[2] + sp[2] * np.arange(nk)
    for seed, c in seeds_model:
        reach = seed.length_mm / 2 + sp[2]
        ks = np.nonzero(np.abs(zs - c[2]) <= reach)[0]
        if ks.size == 0:
            continue
        dx = xs[None, :] - c[0]
        dy = ys[:, None] - c[1]
        r = np.hypot(dx, dy)
        pattern = amplitude_hu * np.cos(12.0 * np.arctan2(dy, dx)) * np.exp(-r / 25.0) * (r > 2.5 * seed.radius_mm + 1.0)
        hu[ks] += pattern[None].astype(np.float32)


def _build(
    name: str,
    layers: list[Layer],
    verts: list[_Vertebra],
    target: str,
    lps_offset: np.ndarray,
    lo_mm: np.ndarray,
    hi_mm: np.ndarray,
    truth_spacing_mm,
    planning_spacing_mm,
    seeds_local: Sequence[tuple[str, Sequence[float], Sequence[float], float, float, SeedShape]],
    with_seeds: bool,
    ct_noise_hu: float,
    streak_amplitude_hu: float,
    rng,
) -> Phantom:
    ts = _spacing3(truth_spacing_mm, "truth_spacing_mm")
    ps = _spacing3(planning_spacing_mm, "planning_spacing_mm")
    for what, v in (("ct_noise_hu", ct_noise_hu), ("streak_amplitude_hu", streak_amplitude_hu)):
        checked_number(v, VirtualPhantomError, f"{what} must be >= 0, got {v}", minimum=0.0)
    target_vert = next(v for v in verts if v.level.name == target)
    seeds_model: list[tuple[Seed, np.ndarray]] = []
    if with_seeds:
        for sname, local_c, local_axis, length, diameter, shape in seeds_local:
            c = target_vert.p(local_c)
            axis = target_vert.r @ np.asarray(local_axis, dtype=np.float64)
            seed = Seed(sname, c + lps_offset, axis, length, diameter, shape)
            seeds_model.append((seed, c))
    t_shape, t_first = _grid(lo_mm, hi_mm, ts, np.zeros(3))
    hu_t, _ = voxelise(layers, t_shape, t_first, ts)
    anatomy = CTVolume(np.clip(hu_t, -1024.0, 3071.0), ts, t_first + lps_offset, np.eye(3), PatientPosition.HFS, f"{name} anatomy")
    del hu_t
    # Planning grid: other voxel size, origin off the truth grid by a fraction of a voxel.
    p_shape, p_first = _grid(lo_mm, hi_mm, ps, np.array([0.37, 0.61, 0.83]) * ps)
    hu_p, labels = voxelise(layers + _seed_layers(seeds_model), p_shape, p_first, ps)
    if streak_amplitude_hu > 0 and seeds_model:
        _streaks(hu_p, p_first, ps, seeds_model, streak_amplitude_hu)
    if ct_noise_hu > 0:
        hu_p += rng.normal(0.0, ct_noise_hu, size=hu_p.shape).astype(np.float32)
    planning = CTVolume(
        np.clip(hu_p, -1024.0, PLANNING_SEED_HU), ps, p_first + lps_offset, np.eye(3), PatientPosition.HFS, f"{name} planning CT"
    )
    return Phantom(
        name=name,
        anatomy=anatomy,
        planning_ct=planning,
        isocentre_lps_mm=target_vert.c + lps_offset,
        labels=labels,
        label_names={v.label: v.level.name for v in verts},
        target_label=target_vert.label,
        seeds=tuple(s for s, _ in seeds_model),
    )


#: Default thoracolumbar seeds in the target vertebra's frame (LPS axes, mm from the body centre):
#: one in the vertebral body, one by the right transverse process, one in the spinous process base.
DEFAULT_THORACOLUMBAR_SEEDS = (
    ("F1", (-7.0, -6.0, 4.0), (0.3, 0.2, 1.0), 4.0, 1.0, SeedShape.CYLINDER),
    ("F2", (-30.0, 20.0, -5.0), (1.0, 0.4, 0.3), 5.0, 0.9, SeedShape.CYLINDER),
    ("F3", (6.0, 40.0, 8.0), (0.2, 1.0, -0.5), 3.0, 1.2, SeedShape.CYLINDER),
)


def thoracolumbar_phantom(
    truth_spacing_mm: float | Sequence[float] = 1.0,
    planning_spacing_mm: float | Sequence[float] = (0.9766, 0.9766, 2.0),
    with_seeds: bool = True,
    target: str = "L1",
    seed: int = 0,
    ct_noise_hu: float = 8.0,
    streak_amplitude_hu: float = 60.0,
) -> Phantom:
    """A thoracolumbar spine (T9-L4) in a trunk with ribs, lungs and bowel gas, lying HFS on a couch.

    Vertebral bodies have a 1.3 mm cortical shell (1700 HU) around cancellous
    bone (250 HU); pedicles, laminae, transverse, articular and spinous
    processes (1400 HU cortex), discs (80 HU), ribs on T9-T12, lungs (-800
    HU) down to about T12, paraspinal muscle (50 HU), soft tissue (40 HU),
    subcutaneous fat (-100 HU), air outside, a carbon-fibre couch. Each level
    has its own seeded asymmetry (position, rotation, process lengths) so a
    wrong level is distinguishable.

    Parameters
    ----------
    truth_spacing_mm : float or (3,) floats
        Voxel size of ``anatomy`` (the grid the kV simulator projects), mm.
    planning_spacing_mm : float or (3,) floats
        Voxel size ``(x, y, z)`` of ``planning_ct``, mm.
    with_seeds : bool
        Implant :data:`DEFAULT_THORACOLUMBAR_SEEDS` (three gold cylinders,
        non-collinear, one inside the vertebral body).
    target : str
        Target vertebra (isocentre at its body centre), one of T9..L4.
    seed : int
        Seed of the generator for the anatomical jitter and the CT noise.
    ct_noise_hu : float
        Standard deviation of the planning CT's Gaussian noise, HU.
    streak_amplitude_hu : float
        Amplitude of the metal streaks around the seeds in the planning CT, HU.

    Returns
    -------
    Phantom
        Planning CT LPS frame, HFS; the field covers 344 x 270 x 270 mm (x, y, z).
    """
    rng = np.random.default_rng(seed)
    layers, verts = _thoracolumbar_model(target, rng)
    lo, hi = np.array([-172.0, -138.0, -135.0]), np.array([172.0, 132.0, 135.0])
    return _build(
        "thoracolumbar", layers, verts, target, THORACOLUMBAR_MODEL_ORIGIN_LPS_MM, lo, hi, truth_spacing_mm,
        planning_spacing_mm, DEFAULT_THORACOLUMBAR_SEEDS, with_seeds, ct_noise_hu, streak_amplitude_hu, rng,
    )


def cervical_phantom(
    truth_spacing_mm: float | Sequence[float] = 1.0,
    planning_spacing_mm: float | Sequence[float] = (0.9766, 0.9766, 2.0),
    target: str = "C4",
    seed: int = 0,
    ct_noise_hu: float = 8.0,
) -> Phantom:
    """A cervical spine (C1-T1) with skull base, mandible and airway in a thermoplastic face mask, HFS.

    The head (skull 1700 HU around brain 35 HU, skull base 1200 HU, mastoids
    800 HU, occipital protuberance, mandible and teeth 2200 HU) and the neck
    (soft tissue, fat, muscle, airway) lie on a foam head rest (-300 HU) and a
    couch, covered anteriorly by a 2.5 mm thermoplastic mask shell (150 HU)
    with an air gap. C1 is an atlas ring, C2 carries the dens; shoulders and
    clavicles close the field at the bottom. No seeds (cervical cases are set
    up on anatomy).

    Parameters
    ----------
    truth_spacing_mm, planning_spacing_mm : float or (3,) floats
        As for :func:`thoracolumbar_phantom`, mm.
    target : str
        Target vertebra, one of C1..T1 (default C4).
    seed : int
        Seed of the anatomical jitter and the CT noise.
    ct_noise_hu : float
        Planning CT noise, HU.

    Returns
    -------
    Phantom
        Planning CT LPS frame, HFS; the field covers 300 x 265 x 300 mm.
    """
    rng = np.random.default_rng(seed)
    layers, verts = _cervical_model(target, rng)
    lo, hi = np.array([-150.0, -125.0, -130.0]), np.array([150.0, 140.0, 170.0])
    return _build(
        "cervical", layers, verts, target, CERVICAL_MODEL_ORIGIN_LPS_MM, lo, hi, truth_spacing_mm,
        planning_spacing_mm, (), False, ct_noise_hu, 0.0, rng,
    )
