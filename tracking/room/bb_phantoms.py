"""BB (calibration) phantoms with their bodies, rendered through the realistic imaging chain.

:func:`render_bb_phantom` images a ``bb-phantom/1`` phantom -- its BBs *and*
its body (PMMA cube with edges, cylinder, holes and inserts; see
:class:`spineguide.calibration.phantom.PhantomBody`) -- with the clinic-like
chain of :mod:`spineguide.tracking.room.chain` (polyenergetic beam, scatter,
heel, gain/offset maps, dead lines, lag-free blur, Poisson and read-out noise),
with the phantom set up off the lasers by a known rigid error.

Physics, per pixel (one ray through the pixel centre for the body, ``n x n``
sub-rays per pixel for the BBs):

- body: exact chords of the ray through the (posed) box or cylinder and its
  features (slab method / ray-cylinder quadratic); a feature replaces the
  body material along its chord (``air`` for a hole). The chain knows water
  and cortical bone; PMMA enters as its *water-equivalent* path, scaled by
  ``mu_PMMA / mu_water`` at the spectrum's mean energy (NIST XCOM PMMA table
  below), so it is hardened like water -- a small approximation;
- BBs: exact sphere chords, entered as *gold-equivalent* chords scaled by
  ``mu_material / mu_gold`` at 60 keV (the attenuation tables refuse the
  tungsten and gold K-edge bands). Tungsten BBs of >= 1 mm are opaque at any
  kV energy either way; steel is partly transparent, as it is;
- the BB displaces body material (ignored: < 3 % of a steel BB's attenuation).

Frames: room frame IEC 61217, mm; the phantom's setup error is a rotation
about its centre marker followed by a translation, both applied before the
known couch shift (``room = R p + centre_offset + setup_t + couch_shift``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from scipy.spatial.transform import Rotation

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry
from spineguide.calibration.phantom import BBPhantom, BodyPart
from spineguide.registration.attenuation import linear_attenuation_per_mm
from spineguide.registration.errors import RegistrationError

from ..errors import SimulationError
from .chain import ChainConfig, DetectorMaps, MaterialPaths, material_mu_per_mm, render_chain_frame
from .kv import BBFrames, _Marker, _ro, _rng, _window_subrays, cylinder_chord_mm

__all__ = ["PMMA_MU_RHO", "SetupError", "body_paths_mm", "render_bb_phantom", "water_equivalent_pmma", "gold_equivalent"]

#: PMMA (polymethyl methacrylate, 1.19 g/cm3) mass attenuation with coherent
#: scattering, cm2/g, NIST XCOM / Hubbell & Seltzer NISTIR 5632, at
#: 20, 30, 40, 50, 60, 80, 100, 150 keV.
PMMA_MU_RHO = (np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0]),
               np.array([0.6326, 0.3302, 0.2350, 0.2038, 0.1924, 0.1751, 0.1641, 0.1456]))
PMMA_DENSITY = 1.19
#: Energy at which a BB's material is converted to a gold-equivalent chord, keV.
BB_EQUIVALENCE_KEV = 60.0


@dataclass(frozen=True, slots=True)
class SetupError:
    """Rigid setup error of a phantom off the lasers, room frame.

    ``translation_mm`` (mm) and ``rotation_deg`` (rotation vector, degrees,
    about the centre marker): ``room = R p + t``.
    """

    translation_mm: np.ndarray = (0.0, 0.0, 0.0)
    rotation_deg: np.ndarray = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("translation_mm", "rotation_deg"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.shape != (3,) or not np.all(np.isfinite(v)):
                raise SimulationError(f"setup error: {name} must be 3 finite numbers, got {np.asarray(getattr(self, name)).tolist()}")
            object.__setattr__(self, name, _ro(v))

    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) rotation matrix ``R``."""
        return Rotation.from_rotvec(np.radians(self.rotation_deg)).as_matrix()

    @classmethod
    def random(cls, rng: np.random.Generator, max_mm: float = 2.0, max_deg: float = 1.0) -> "SetupError":
        """A setup error of uniformly random direction, magnitude uniform in [0, max_mm] / [0, max_deg]."""
        def vec(limit):
            d = rng.normal(size=3)
            return d / np.linalg.norm(d) * rng.uniform(0.0, limit)
        return cls(vec(max_mm), vec(max_deg))


def water_equivalent_pmma(energy_kev: float) -> float:
    """``mu_PMMA / mu_water`` at ``energy_kev`` (keV, 20-150): mm of water per mm of PMMA."""
    e, table = PMMA_MU_RHO
    mu_pmma = float(np.exp(np.interp(math.log(energy_kev), np.log(e), np.log(table)))) * PMMA_DENSITY / 10.0
    return mu_pmma / float(material_mu_per_mm("water", energy_kev)[0])


def gold_equivalent(material: str) -> float:
    """``mu_material / mu_gold`` at :data:`BB_EQUIVALENCE_KEV`: mm of gold per mm of the BB's material."""
    try:
        return linear_attenuation_per_mm(material, BB_EQUIVALENCE_KEV) / linear_attenuation_per_mm("gold", BB_EQUIVALENCE_KEV)
    except RegistrationError as err:
        raise SimulationError(f"BB material {material!r}: {err}") from err


def _box_chord_mm(src: np.ndarray, dirs: np.ndarray, centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Chord (mm) of rays ``src + t d`` (src (3,) or (N, 3), d (N, 3) unit) through an axis-aligned box (slab method)."""
    lo = centre - size / 2.0 - src
    hi = centre + size / 2.0 - src
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs
        t1, t2 = lo * inv, hi * inv
    # A ray parallel to a slab is inside it for all t (or never).
    par = dirs == 0.0
    inside = (lo <= 0.0) & (hi >= 0.0)
    t_lo = np.where(par, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2))
    t_hi = np.where(par, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2))
    near = np.maximum(t_lo.max(axis=1), 0.0)
    far = t_hi.min(axis=1)
    return np.maximum(far - near, 0.0)


def _part_chord_mm(part: BodyPart, src: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    if part.shape == "box":
        return _box_chord_mm(src, dirs, part.centre_mm, part.size_mm)
    return cylinder_chord_mm(src, dirs, part.centre_mm, part.axis, part.length_mm, part.radius_mm)


def body_paths_mm(phantom: BBPhantom, imager: ImagerGeometry, placement_r: np.ndarray, placement_t: np.ndarray) -> dict[str, np.ndarray]:
    """Path length (mm, (rows, cols)) per body material along each pixel-centre ray.

    ``placement_r`` (3x3) and ``placement_t`` (mm) place the phantom in the
    room: ``room = R p + t``. Materials as in ``BODY_MATERIALS``, ``air`` left out.
    """
    rows, cols = imager.rows, imager.cols
    out: dict[str, np.ndarray] = {}
    if phantom.body is None:
        return out
    cc, rr = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    src, dirs = imager.backproject(np.stack([cc.ravel(), rr.ravel()], axis=1))
    # Rays into the phantom's frame: p = R^T (x - t).
    src_p = (np.asarray(src, dtype=np.float64) - placement_t) @ placement_r  # the source, (3,)
    dirs_p = np.asarray(dirs, dtype=np.float64) @ placement_r
    body = phantom.body
    outer = _part_chord_mm(body.outer, src_p, dirs_p)
    out[body.outer.material] = outer.copy()
    for f in body.features:
        c = np.minimum(_part_chord_mm(f, src_p, dirs_p), outer)
        out[body.outer.material] -= c
        out[f.material] = out.get(f.material, 0.0) + c
    out.pop("air", None)
    return {k: np.maximum(v, 0.0).reshape(rows, cols) for k, v in out.items()}


def _bb_windows(imager: ImagerGeometry, centres_room: np.ndarray, diameters: np.ndarray, factors: np.ndarray, n: int):
    markers = [_Marker(c, np.array([0.0, 0.0, 1.0]), d, d / 2.0, True, 1.0) for c, d in zip(centres_room, diameters)]
    index = {id(m): f for m, f in zip(markers, factors)}
    out = []
    for r0, r1, c0, c1, group, src, dirs in _window_subrays(imager, markers, n):
        chord = np.zeros(len(dirs))
        for m in group:
            chord += index[id(m)] * m.chord(src, dirs)
        out.append((r0, r1, c0, c1, chord.reshape(r1 - r0, n, c1 - c0, n)))
    return out


def render_bb_phantom(
    geometry: StereoGeometry,
    phantom: BBPhantom,
    chain: ChainConfig | None = None,
    *,
    setup: SetupError | None = None,
    couch_shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
    seed: int | np.random.Generator = 0,
    bb_positions_room_mm: np.ndarray | None = None,
) -> BBFrames:
    """Raw frames of a BB phantom with its body through the realistic chain, and the BBs' true projections.

    Parameters
    ----------
    geometry : StereoGeometry
        The true imaging geometry, room frame.
    phantom : BBPhantom
        Markers (materials and diameters per BB) and body; ``centre_offset_mm`` is honoured.
    chain : ChainConfig, optional
        Default: :meth:`ChainConfig.clinic` at i0 20,000.
    setup : SetupError, optional
        The phantom's placement error off the lasers (room frame).
    couch_shift_mm : (3,) array
        Known couch shift of this exposure, room frame, mm.
    seed : int or numpy Generator
        Noise (the panel maps come from ``chain.maps_seed``, fixed per panel).
    bb_positions_room_mm : (N, 3) array, optional
        Where the BBs really are (room frame, mm), overriding the phantom's
        placed markers -- e.g. to render a phantom whose file is wrong; the
        body is always placed from the phantom and ``setup``.

    Returns
    -------
    BBFrames
        ``frames[imager]`` raw (uint16 or float32 per chain), ``centres_px``
        the true ``(col, row)`` projection of every BB centre,
        ``bb_positions_room_mm`` the true room positions, ``i0`` the chain's i0.
    """
    if not isinstance(phantom, BBPhantom):
        raise SimulationError(f"expected a BBPhantom, got {type(phantom).__name__}")
    chain = ChainConfig.clinic(i0=20000.0) if chain is None else chain
    setup = SetupError() if setup is None else setup
    shift = np.asarray(couch_shift_mm, dtype=np.float64)
    if shift.shape != (3,) or not np.all(np.isfinite(shift)):
        raise SimulationError(f"couch_shift_mm must be 3 finite numbers, got {np.asarray(couch_shift_mm).tolist()}")
    r = setup.rotation
    t = phantom.centre_offset_mm + setup.translation_mm + shift
    if bb_positions_room_mm is None:
        pts = phantom.positions_mm @ r.T + t
    else:
        pts = np.asarray(bb_positions_room_mm, dtype=np.float64)
        if pts.shape != (phantom.n_markers, 3) or not np.all(np.isfinite(pts)):
            raise SimulationError(f"bb_positions_room_mm must be finite ({phantom.n_markers}, 3), got {pts.shape}")
    factors = np.array([gold_equivalent(m) for m in phantom.materials])
    w_pmma = water_equivalent_pmma(chain.spectrum.mean_energy_kev)
    rng = _rng(seed)
    frames, centres = {}, {}
    for k, im in enumerate(geometry.imagers):
        paths = body_paths_mm(phantom, im, r, t)
        zero = np.zeros((im.rows, im.cols))
        water = paths.get("water", zero) + w_pmma * paths.get("pmma", zero)
        mp = MaterialPaths(water, paths.get("cortical_bone", zero))
        windows = _bb_windows(im, pts, phantom.diameters_mm, factors, chain.seed_supersampling)
        maps = DetectorMaps.make(im.rows, im.cols, chain, k)
        frames[im.name] = render_chain_frame(mp, im, chain, maps, rng, windows).raw
        centres[im.name] = _ro(im.project(pts))
    return BBFrames(MappingProxyType(frames), MappingProxyType(centres), _ro(pts), float(chain.i0))
