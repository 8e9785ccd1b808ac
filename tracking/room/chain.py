"""A clinic-like kV imaging chain for the virtual room: spectrum, scatter, heel, panel defects and noise.

The simple image model of :mod:`spineguide.tracking.room.kv` (one effective energy,
optional scatter and heel) makes frames far cleaner than a clinic's. This
module adds what a real chain does to the same line integrals, each effect
switchable on its own (``docs/VIRTUAL_ROOM.md`` gives the sources):

``signal = blur( heel(col) i0 T_poly + S ) + lag * previous``,
``raw = gain * (Poisson(signal) + N(0, e)) + offset``, dead lines at 0,
clipped to 0..65535.

- **Polyenergetic beam and beam hardening** (:class:`Spectrum`): a tungsten
  anode spectrum after Kramers' law, photons per keV ``~ (kVp - E) / E``,
  filtered by aluminium, seen by an energy-integrating panel (signal weight
  ``E N(E)``). The transmission of each pixel is the spectrum-weighted
  Beer-Lambert integral ``T = sum_E w(E) exp(-sum_m mu_m(E) l_m)`` over the
  path lengths ``l_m`` through water, cortical bone and gold, with mass
  attenuation coefficients from NIST XCOM (Hubbell & Seltzer, NISTIR 5632),
  so bone and gold look less dense behind more tissue.
- **Scatter**: ``S = SPR (G_sigma * (P t / t_ref))``: the primary ``P``
  weighted by the local tissue thickness ``t`` relative to a reference
  thickness, smoothed by a wide Gaussian kernel; the scatter-to-primary ratio
  behind a uniform slab of thickness ``t_ref`` is ``SPR``.
- **Heel effect**: a linear gain of the source output across the columns.
- **Panel**: a fixed gain (flat-field) map, a dark (offset) map and dead
  rows/columns per imager (:class:`DetectorMaps`, seeded per imager, the same
  for every frame), image lag (a fraction of the previous frame's signal),
  Gaussian blur, Poisson quantum noise and Gaussian electronic noise.

Units: lengths in mm (room frame, panel pixels as ``image[row, col]``),
signals in detector counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import cv2
import numpy as np

from spineguide.calibration.foundation import checked_integer, checked_number
from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry
from spineguide.registration.attenuation import DEFAULT_CT_ENERGY_KEV, bone_hu
from spineguide.registration.drr import AttenuationVolume, compute_drr
from spineguide.registration.pose import Pose
from spineguide.registration.volume import room_from_lps_matrix

from ..errors import SimulationError
from .kv import FrameTruth, OutputDtype, StereoFrames, _Marker, _rng, _ro, _window_subrays
from .phantoms import Phantom, Seed, SeedShape

__all__ = [
    "CHAIN_MATERIALS",
    "ChainConfig",
    "DetectorMaps",
    "MaterialPaths",
    "RealisticSimulator",
    "Spectrum",
    "material_mu_per_mm",
    "render_chain_frame",
    "water_bone_fractions",
]

# ---------------------------------------------------------------------------- attenuation tables
# NIST XCOM / Hubbell & Seltzer, NISTIR 5632 (1995), mu/rho with coherent scattering, cm2/g.
# Gold's K edge (80.725 keV) is tabulated on both sides; interpolation is log-log within one side.
_E_KEV = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
_GOLD_K_EDGE_KEV = 80.725
#: name -> (density g/cm3, mu/rho at _E_KEV); gold carries its K-edge values separately.
CHAIN_MATERIALS: Mapping[str, tuple[float, np.ndarray]] = MappingProxyType({
    "water": (1.0, np.array([0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505])),
    "cortical_bone": (1.92, np.array([4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480])),
    "aluminium": (2.699, np.array([3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378])),
    "gold": (19.32, np.array([78.83, 27.27, 13.10, 7.256, 4.528, 2.185, 5.158, 1.859])),
})
_GOLD_BELOW_EDGE = (np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, _GOLD_K_EDGE_KEV]),
                    np.array([78.83, 27.27, 13.10, 7.256, 4.528, 2.185, 2.141]))
_GOLD_ABOVE_EDGE = (np.array([_GOLD_K_EDGE_KEV, 100.0, 150.0]), np.array([8.904, 5.158, 1.859]))


def material_mu_per_mm(material: str, energy_kev) -> np.ndarray:
    """Linear attenuation (1/mm) of ``material`` at energies ``energy_kev`` (keV, 20-150), log-log interpolated.

    Raises
    ------
    SimulationError
        Unknown material or an energy outside 20-150 keV.
    """
    if material not in CHAIN_MATERIALS:
        raise SimulationError(f"unknown material {material!r} (known: {', '.join(CHAIN_MATERIALS)})")
    e = np.atleast_1d(np.asarray(energy_kev, dtype=np.float64))
    if not np.all(np.isfinite(e)) or e.min() < _E_KEV[0] or e.max() > _E_KEV[-1]:
        raise SimulationError(f"energies must lie in {_E_KEV[0]:g}-{_E_KEV[-1]:g} keV, got {e.min():g}-{e.max():g}")
    density, table = CHAIN_MATERIALS[material]
    if material == "gold":
        out = np.empty_like(e)
        lo = e <= _GOLD_K_EDGE_KEV
        for side, (xs, ys) in ((lo, _GOLD_BELOW_EDGE), (~lo, _GOLD_ABOVE_EDGE)):
            out[side] = np.exp(np.interp(np.log(e[side]), np.log(xs), np.log(ys)))
    else:
        out = np.exp(np.interp(np.log(e), np.log(_E_KEV), np.log(table)))
    return out * density / 10.0


def water_bone_fractions(hu) -> tuple[np.ndarray, np.ndarray]:
    """Water and cortical-bone volume fractions of CT numbers: the bilinear HU model, float32.

    ``HU <= 0``: water of density ``1 + HU/1000`` (air -1000 HU -> 0, clipped
    at 0 below), no bone. ``HU > 0``: a bone fraction ``HU / HU_bone`` and a
    water fraction ``1 - HU / HU_bone`` (clipped at 0 above ``HU_bone``), with
    ``HU_bone = bone_hu(DEFAULT_CT_ENERGY_KEV)`` the CT number of cortical
    bone (:mod:`spineguide.registration.attenuation`, Burger et al. 2002). A
    fraction volume on a voxel grid, projected as if it were an attenuation
    (1/mm), gives the path length (mm) through that material: this is how the
    chain's :class:`MaterialPaths` are made from a CT.

    Parameters
    ----------
    hu : array_like
        CT numbers (HU), any shape, finite; the frame of the grid is the caller's.

    Returns
    -------
    (water, bone) : two float32 arrays of ``hu``'s shape, dimensionless, >= 0

    Raises
    ------
    SimulationError
        Non-finite CT numbers.
    """
    h = np.asarray(hu, dtype=np.float32)
    if not np.all(np.isfinite(h)):
        raise SimulationError("water/bone decomposition: the CT numbers must be finite")
    hu_bone = np.float32(bone_hu(DEFAULT_CT_ENERGY_KEV))
    bone = np.clip(h / hu_bone, 0.0, None).astype(np.float32)
    water = np.where(h <= 0, np.clip(1.0 + h / np.float32(1000.0), 0.0, None), np.clip(1.0 - bone, 0.0, None))
    return water.astype(np.float32), bone


# ---------------------------------------------------------------------------- spectrum
@dataclass(frozen=True, slots=True)
class Spectrum:
    """Detector-signal weights of an X-ray beam over energy bins.

    Attributes
    ----------
    energies_kev : (K,) array
        Bin centres, keV.
    weights : (K,) array
        Share of the unattenuated detector signal in each bin (sums to 1).
    label : str
        How it was made (for reports).
    kvp, filtration_mm_al : float or None
        Tube voltage (kV) and total aluminium filtration (mm) of a
        :meth:`kramers` spectrum; None for any other.
    """

    energies_kev: np.ndarray
    weights: np.ndarray
    label: str = ""
    kvp: float | None = None
    filtration_mm_al: float | None = None

    def __post_init__(self) -> None:
        e = np.atleast_1d(np.asarray(self.energies_kev, dtype=np.float64))
        w = np.atleast_1d(np.asarray(self.weights, dtype=np.float64))
        if e.ndim != 1 or e.shape != w.shape or len(e) == 0:
            raise SimulationError(f"spectrum: energies {e.shape} and weights {w.shape} must be equal 1D arrays")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise SimulationError("spectrum: weights must be finite, non-negative and not all zero")
        material_mu_per_mm("water", e)  # range check
        for name in ("kvp", "filtration_mm_al"):
            v = getattr(self, name)
            if v is not None:
                checked_number(v, SimulationError, f"spectrum: {name} must be None or a finite number >= 0, got {v!r}",
                               minimum=0.0)
        object.__setattr__(self, "energies_kev", _ro(e))
        object.__setattr__(self, "weights", _ro(w / w.sum()))

    @classmethod
    def kramers(cls, kvp: float = 120.0, filtration_mm_al: float = 2.5, bin_kev: float = 2.5) -> "Spectrum":
        """Tungsten-anode bremsstrahlung after Kramers' law, aluminium filtration, energy-integrating panel.

        Photons per keV ``N(E) ~ (kVp - E) / E`` (Kramers 1923), times the
        filter transmission ``exp(-mu_Al(E) t)``; the panel integrates energy,
        so the signal weight is ``E N(E)``. Characteristic lines are left out
        (a few per cent of the signal at 120 kVp). Bins from 20 keV (below,
        the filtered beam carries almost nothing) to ``kvp``.

        Parameters
        ----------
        kvp : float
            Tube voltage, kV (40-150).
        filtration_mm_al : float
            Total filtration, mm of aluminium (>= 0).
        bin_kev : float
            Width of an energy bin, keV.
        """
        if not (40.0 <= kvp <= 150.0) or not math.isfinite(filtration_mm_al) or filtration_mm_al < 0:
            raise SimulationError(f"spectrum: kvp {kvp} must be in 40-150 kV and filtration {filtration_mm_al} mm >= 0")
        if not (0.1 <= bin_kev <= 10.0):
            raise SimulationError(f"spectrum: bin_kev {bin_kev} must be in 0.1-10 keV")
        n = max(1, int(math.ceil((kvp - 20.0) / bin_kev)))
        edges = np.linspace(20.0, kvp, n + 1)
        e = 0.5 * (edges[:-1] + edges[1:])
        photons = (kvp - e) / e * np.exp(-material_mu_per_mm("aluminium", e) * filtration_mm_al)
        return cls(e, e * photons, f"Kramers {kvp:g} kVp, {filtration_mm_al:g} mm Al", float(kvp), float(filtration_mm_al))

    @classmethod
    def mono(cls, energy_kev: float) -> "Spectrum":
        """A single energy (the model of :mod:`spineguide.tracking.room.kv`)."""
        return cls(np.array([float(energy_kev)]), np.array([1.0]), f"{energy_kev:g} keV")

    @property
    def mean_energy_kev(self) -> float:
        """Signal-weighted mean energy, keV."""
        return float(self.weights @ self.energies_kev)

    def mu_per_mm(self, material: str) -> np.ndarray:
        """``mu`` (1/mm) of ``material`` at every bin, (K,)."""
        return material_mu_per_mm(material, self.energies_kev)

    def transmission(self, paths_mm: Mapping[str, np.ndarray | float]) -> np.ndarray:
        """Spectrum-weighted Beer-Lambert transmission ``sum_E w(E) exp(-sum_m mu_m(E) l_m)``.

        Parameters
        ----------
        paths_mm : mapping material -> array or float
            Path length through each material, mm (arrays broadcast together).

        Returns
        -------
        float64 array (broadcast shape), in (0, 1]
        """
        mats = [(self.mu_per_mm(m), np.asarray(v, dtype=np.float64)) for m, v in paths_mm.items()]
        shape = np.broadcast_shapes(*(v.shape for _, v in mats)) if mats else ()
        out = np.zeros(shape)
        for k, w in enumerate(self.weights):
            line = np.zeros(shape)
            for mu, v in mats:
                line = line + mu[k] * v
            out += w * np.exp(-line)
        return out


# ---------------------------------------------------------------------------- chain configuration
@dataclass(frozen=True, slots=True)
class ChainConfig:
    """One clinic's imaging chain; every effect can be switched off (0 / False).

    Attributes
    ----------
    i0 : float
        Unattenuated signal at the panel centre, counts (2,000-40,000 in a
        clinic; quanta per pixel with ``quantum_noise``).
    spectrum : Spectrum
        Beam spectrum; ``Spectrum.mono(60)`` turns beam hardening off.
    scatter_to_primary : float
        Scatter-to-primary ratio behind ``scatter_reference_thickness_mm`` of tissue (0-5).
    scatter_reference_thickness_mm : float
        Tissue thickness at which the ratio is ``scatter_to_primary``; the
        local scatter source scales with the local thickness.
    scatter_sigma_mm : float
        Width (Gaussian sigma) of the scatter kernel on the panel, mm.
    heel_gradient : float
        Relative change of the source output across the columns (anode heel), e.g. 0.15.
    gain_rms : float
        Relative spread of the panel gain map (half smooth/banded, half per pixel).
    offset_counts, offset_rms_counts : float
        Mean and per-pixel spread of the dark (offset) map, counts.
    dead_rows, dead_cols : int
        Number of dead lines (reading 0) per panel.
    lag_fraction : float
        Share of the previous frame's signal still read out (0-0.5).
    blur_sigma_px : float
        Detector blur (Gaussian sigma), pixels.
    quantum_noise : bool
        Draw Poisson noise on the signal.
    electronic_noise_counts : float
        Sigma of the additive Gaussian read-out noise, counts.
    dtype : OutputDtype
    seed_supersampling : int
        Sub-rays per pixel and axis for the analytic seeds.
    maps_seed : int
        Seed of the panel maps (gain, offset, dead lines): fixed per panel.
    """

    i0: float = 20000.0
    spectrum: Spectrum = Spectrum.mono(60.0)
    scatter_to_primary: float = 0.0
    scatter_reference_thickness_mm: float = 350.0
    scatter_sigma_mm: float = 40.0
    heel_gradient: float = 0.0
    gain_rms: float = 0.0
    offset_counts: float = 0.0
    offset_rms_counts: float = 0.0
    dead_rows: int = 0
    dead_cols: int = 0
    lag_fraction: float = 0.0
    blur_sigma_px: float = 0.5
    quantum_noise: bool = True
    electronic_noise_counts: float = 0.0
    dtype: OutputDtype = OutputDtype.UINT16
    seed_supersampling: int = 4
    maps_seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("i0", 1.0, 65535.0), ("scatter_to_primary", 0.0, 5.0), ("scatter_reference_thickness_mm", 1.0, 1000.0),
            ("scatter_sigma_mm", 1.0, 1000.0), ("heel_gradient", -1.0, 1.0), ("gain_rms", 0.0, 0.5),
            ("offset_counts", 0.0, 10000.0), ("offset_rms_counts", 0.0, 1000.0), ("lag_fraction", 0.0, 0.5),
            ("blur_sigma_px", 0.0, 50.0), ("electronic_noise_counts", 0.0, 1000.0),
        )
        for name, lo, hi in checks:
            v = getattr(self, name)
            v = checked_number(v, SimulationError, f"imaging chain: {name} = {v!r} is outside [{lo:g}, {hi:g}]",
                               minimum=lo, maximum=hi)
            object.__setattr__(self, name, v)
        for name in ("dead_rows", "dead_cols", "seed_supersampling", "maps_seed"):
            v = getattr(self, name)
            least = 1 if name == "seed_supersampling" else 0
            checked_integer(v, SimulationError, f"imaging chain: {name} must be a non-negative integer, got {v!r}",
                            minimum=least)
        if not isinstance(self.spectrum, Spectrum):
            raise SimulationError(f"imaging chain: spectrum must be a Spectrum, got {self.spectrum!r}")
        if not isinstance(self.quantum_noise, bool):
            raise SimulationError(f"imaging chain: quantum_noise must be a bool, got {self.quantum_noise!r}")
        object.__setattr__(self, "dtype", OutputDtype(self.dtype))

    def settings(self) -> dict:
        """The chain as JSON-ready numbers (counts, mm, keV, kV), to record how a frame was made.

        Every field of the configuration, the spectrum as its label, kVp,
        filtration, signal-weighted mean energy and bins (``energies_kev``,
        ``weights``), and the output ``dtype`` as its value.
        """
        out: dict = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if name == "spectrum":
                sp = v
                out[name] = {"label": sp.label, "kvp": sp.kvp, "filtration_mm_al": sp.filtration_mm_al,
                             "mean_energy_kev": sp.mean_energy_kev,
                             "energies_kev": [float(e) for e in sp.energies_kev],
                             "weights": [float(w) for w in sp.weights]}
            elif name == "dtype":
                out[name] = v.value
            else:
                out[name] = v if isinstance(v, (bool, int, float)) else float(v)
        return out

    @classmethod
    def clinic(cls, i0: float = 6000.0, scatter_to_primary: float = 1.0, **overrides) -> "ChainConfig":
        """A clinic-like chain: 120 kVp, 2.5 mm Al, heel 15 %, 5 % gain map, offset 200 counts,
        one dead row and column, 2 % lag, 0.6 px blur, Poisson and 4 counts read-out noise."""
        values = dict(
            i0=i0, spectrum=Spectrum.kramers(120.0, 2.5), scatter_to_primary=scatter_to_primary, heel_gradient=0.15,
            gain_rms=0.05, offset_counts=200.0, offset_rms_counts=8.0, dead_rows=1, dead_cols=1, lag_fraction=0.02,
            blur_sigma_px=0.6, electronic_noise_counts=4.0,
        )
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class DetectorMaps:
    """Fixed per-panel maps of one imager, ``map[row, col]``.

    ``raw = gain * signal + offset``: a flat-field (gain, mean 1) and a dark
    (offset, counts) map as a clinic's panel calibration records them, and the
    dead lines (True = dead pixel).
    """

    gain: np.ndarray
    offset_counts: np.ndarray
    dead: np.ndarray

    def __post_init__(self) -> None:
        g = _ro(self.gain, np.float32)
        o = _ro(self.offset_counts, np.float32)
        d = _ro(self.dead, bool)
        if g.ndim != 2 or g.shape != o.shape or g.shape != d.shape:
            raise SimulationError(
                f"detector maps: gain {g.shape}, offset {o.shape}, dead {d.shape} must be one 2D shape")
        if not np.all(np.isfinite(g)) or np.any(g <= 0) or not np.all(np.isfinite(o)):
            raise SimulationError("detector maps: gain must be finite and positive, offset finite")
        object.__setattr__(self, "gain", g)
        object.__setattr__(self, "offset_counts", o)
        object.__setattr__(self, "dead", d)

    @classmethod
    def make(cls, rows: int, cols: int, chain: ChainConfig, imager_index: int = 0) -> "DetectorMaps":
        """The seeded maps of panel ``imager_index`` under ``chain`` (identity maps where the effects are off)."""
        rng = np.random.default_rng([chain.maps_seed, imager_index, 19])
        gain = np.ones((rows, cols), np.float32)
        if chain.gain_rms > 0:
            # Smooth field (scintillator thickness) and read-out-chip banding across columns, plus pixel spread.
            coarse = rng.normal(0.0, 1.0, (8, 8)).astype(np.float32)
            smooth = cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_CUBIC)
            smooth /= max(float(smooth.std()), 1e-6)
            bands = np.repeat(rng.normal(0.0, 1.0, math.ceil(cols / 128)), 128)[:cols].astype(np.float32)
            s = chain.gain_rms / math.sqrt(3.0)
            gain = 1.0 + s * smooth + s * bands[None, :] + s * rng.normal(0.0, 1.0, (rows, cols)).astype(np.float32)
            gain = np.clip(gain, 0.2, None)
        offset = np.full((rows, cols), chain.offset_counts, np.float32)
        if chain.offset_rms_counts > 0:
            offset += chain.offset_rms_counts * rng.normal(0.0, 1.0, (rows, cols)).astype(np.float32)
        dead = np.zeros((rows, cols), bool)
        if chain.dead_rows:
            dead[rng.choice(rows, size=min(chain.dead_rows, rows), replace=False), :] = True
        if chain.dead_cols:
            dead[:, rng.choice(cols, size=min(chain.dead_cols, cols), replace=False)] = True
        return cls(gain, offset, dead)


# ---------------------------------------------------------------------------- one frame
@dataclass(frozen=True, slots=True)
class MaterialPaths:
    """Path lengths (mm) through the anatomy's materials, one panel: ``water_mm``, ``bone_mm`` (rows, cols)."""

    water_mm: np.ndarray
    bone_mm: np.ndarray

    def __post_init__(self) -> None:
        w = _ro(self.water_mm)
        b = _ro(self.bone_mm)
        if w.ndim != 2 or w.shape != b.shape or not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise SimulationError(f"material paths must be finite 2D arrays of one shape, got {w.shape}, {b.shape}")
        object.__setattr__(self, "water_mm", w)
        object.__setattr__(self, "bone_mm", b)

    @property
    def thickness_mm(self) -> np.ndarray:
        """Tissue traversed (water + bone path), mm."""
        return self.water_mm + self.bone_mm


def _seed_windows(imager: ImagerGeometry, markers: Sequence[_Marker], n: int):
    """Per merged window ``(r0, r1, c0, c1, gold_chord_mm)``: sub-ray gold chords of shape (h, n, w, n)."""
    out = []
    for r0, r1, c0, c1, group, src, dirs in _window_subrays(imager, markers, n):
        chord = np.zeros(len(dirs))
        for m in group:
            chord += m.chord(src, dirs)
        out.append((r0, r1, c0, c1, chord.reshape(r1 - r0, n, c1 - c0, n)))
    return out


def primary_transmission(paths: MaterialPaths, spectrum: Spectrum, seed_windows=()) -> np.ndarray:
    """Polyenergetic transmission of anatomy and gold seeds, (rows, cols) float64 in (0, 1].

    Outside the seed windows ``Spectrum.transmission`` of the water and bone
    paths; inside, per energy bin, the anatomy's transmission times the mean
    over the sub-rays of gold's ``exp(-mu_gold(E) chord)`` (partial coverage).
    """
    out = spectrum.transmission({"water": paths.water_mm, "cortical_bone": paths.bone_mm})
    if not seed_windows:
        return out
    mu_w, mu_b, mu_g = spectrum.mu_per_mm("water"), spectrum.mu_per_mm("cortical_bone"), spectrum.mu_per_mm("gold")
    for r0, r1, c0, c1, chord in seed_windows:
        pw, pb = paths.water_mm[r0:r1, c0:c1], paths.bone_mm[r0:r1, c0:c1]
        acc = np.zeros(pw.shape)
        for k, w in enumerate(spectrum.weights):
            acc += w * np.exp(-(mu_w[k] * pw + mu_b[k] * pb)) * np.exp(-mu_g[k] * chord).mean(axis=(1, 3))
        out[r0:r1, c0:c1] = acc
    return out


def _smooth_wide(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian of a wide sigma on a coarse copy (scatter is smooth), replicated borders, float64."""
    rows, cols = image.shape
    f = max(1, int(sigma_px // 4))
    small = cv2.resize(image.astype(np.float32), (max(cols // f, 1), max(rows // f, 1)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / f, borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR).astype(np.float64)


@dataclass(frozen=True, slots=True)
class ChainFrame:
    """One frame through the chain: ``raw`` (what the panel delivers), and the noise-free stages, counts.

    ``primary`` (heel included) and ``scatter`` before blur; ``signal`` the
    expected signal after blur and lag (what the next frame's lag reads).
    """

    raw: np.ndarray
    primary: np.ndarray
    scatter: np.ndarray
    signal: np.ndarray


def render_chain_frame(
    paths: MaterialPaths,
    imager: ImagerGeometry,
    chain: ChainConfig,
    maps: DetectorMaps,
    rng: np.random.Generator,
    seed_windows=(),
    previous_signal: np.ndarray | None = None,
) -> ChainFrame:
    """Raw frame of one panel from the anatomy's material paths and the seeds' gold chords.

    Parameters
    ----------
    paths : MaterialPaths
        Water and bone path lengths per pixel, mm.
    imager : ImagerGeometry
        The panel (size, pixel pitch for the scatter kernel).
    chain : ChainConfig
    maps : DetectorMaps
        This panel's gain, offset and dead lines.
    rng : numpy Generator
        Noise.
    seed_windows : sequence, optional
        Gold chords of the seeds (``_seed_windows``).
    previous_signal : (rows, cols) array, optional
        The previous frame's ``signal`` (image lag).

    Returns
    -------
    ChainFrame
    """
    rows, cols = imager.rows, imager.cols
    if paths.water_mm.shape != (rows, cols) or maps.gain.shape != (rows, cols):
        raise SimulationError(
            f"imager '{imager.name}': paths {paths.water_mm.shape} and maps {maps.gain.shape} must be {rows}x{cols}"
        )
    primary = chain.i0 * primary_transmission(paths, chain.spectrum, seed_windows)
    if chain.heel_gradient:
        primary *= (1.0 + chain.heel_gradient * (np.arange(cols) / max(cols - 1, 1) - 0.5))[None, :]
    scatter = np.zeros_like(primary)
    if chain.scatter_to_primary:
        sigma_px = chain.scatter_sigma_mm / float(np.mean(imager.pixel_spacing_mm))
        source = primary * (paths.thickness_mm / chain.scatter_reference_thickness_mm)
        scatter = chain.scatter_to_primary * _smooth_wide(source, sigma_px)
    signal = primary + scatter
    if chain.blur_sigma_px > 0:
        signal = cv2.GaussianBlur(signal, (0, 0), chain.blur_sigma_px, borderType=cv2.BORDER_REPLICATE)
    if chain.lag_fraction and previous_signal is not None:
        signal = signal + chain.lag_fraction * np.asarray(previous_signal, dtype=np.float64)
    read = rng.poisson(signal).astype(np.float64) if chain.quantum_noise else signal.copy()
    if chain.electronic_noise_counts:
        read += rng.normal(0.0, chain.electronic_noise_counts, read.shape)
    raw = read * maps.gain + maps.offset_counts
    raw[maps.dead] = 0.0
    if chain.dtype is OutputDtype.UINT16:
        raw = np.clip(np.rint(raw), 0, 65535).astype(np.uint16)
    else:
        raw = np.clip(raw, 0, 65535).astype(np.float32)
    raw.setflags(write=False)
    return ChainFrame(raw, primary, scatter, signal)


# ---------------------------------------------------------------------------- simulator
class RealisticSimulator:
    """Stereo frames of a phantom through a clinic-like chain (:class:`ChainConfig`), with ground truth.

    The anatomy is split into water and cortical-bone path lengths with the
    bilinear HU model of :mod:`spineguide.registration.attenuation`
    (:func:`water_bone_fractions`), each projected by :func:`spineguide.registration.drr.compute_drr`
    (two DRRs per view); the seeds are exact gold chords. The path lengths
    can also be given from elsewhere (``paths``, e.g. plastimatch).

    Parameters
    ----------
    phantom : Phantom
    geometry : StereoGeometry
        Imagers, room frame.
    chain : ChainConfig
        Default chain of :meth:`render`.
    """

    def __init__(self, phantom: Phantom, geometry: StereoGeometry, chain: ChainConfig | None = None) -> None:
        if not isinstance(phantom, Phantom):
            raise SimulationError(f"expected a Phantom, got {type(phantom).__name__}")
        if not isinstance(geometry, StereoGeometry):
            raise SimulationError(f"expected a StereoGeometry, got {type(geometry).__name__}")
        self.phantom = phantom
        self.geometry = geometry
        self.chain = ChainConfig() if chain is None else chain
        water, bone = water_bone_fractions(phantom.anatomy.hu)
        room = phantom.anatomy.room_from_index(phantom.isocentre_lps_mm)
        self.water_volume = AttenuationVolume(water, room)
        self.bone_volume = AttenuationVolume(bone, room)
        self._room_from_lps = room_from_lps_matrix(phantom.anatomy.patient_position)
        self._maps: dict[tuple, DetectorMaps] = {}

    def maps(self, imager_name: str, chain: ChainConfig | None = None) -> DetectorMaps:
        """The fixed panel maps of one imager under ``chain`` (default: the simulator's)."""
        chain = self.chain if chain is None else chain
        names = self.geometry.names
        if imager_name not in names:
            raise SimulationError(f"no imager '{imager_name}' (imagers: {', '.join(names)})")
        key = (imager_name, chain.gain_rms, chain.offset_counts, chain.offset_rms_counts, chain.dead_rows,
               chain.dead_cols, chain.maps_seed)
        if key not in self._maps:
            im = self.geometry[imager_name]
            self._maps[key] = DetectorMaps.make(im.rows, im.cols, chain, names.index(imager_name))
        return self._maps[key]

    def planned_room_mm(self, seeds: Sequence[Seed] | None = None) -> np.ndarray:
        """Seed centres (the phantom's, or ``seeds`` in its planning-CT LPS) in the room at perfect setup, (N, 3) mm."""
        if seeds is None:
            return self.phantom.seeds_room_mm()
        if not seeds:
            return np.zeros((0, 3))
        pts = np.stack([s.centre_lps_mm for s in seeds])
        return self.phantom.planning_ct.lps_to_room(pts, self.phantom.isocentre_lps_mm)

    def markers(self, pose: Pose, seeds_room_mm: np.ndarray | None = None,
                seeds: Sequence[Seed] | None = None) -> list[_Marker]:
        """The seeds at ``pose`` (room frame): the phantom's, or ``seeds`` (planning-CT LPS) instead;
        ``seeds_room_mm`` overrides the centres (migration)."""
        chosen = self.phantom.seeds if seeds is None else tuple(seeds)
        for s in chosen:
            if s.material != "gold" or s.shape is SeedShape.SPHERE:
                raise SimulationError(f"seed {s.name!r}: the imaging chain renders gold cylinders only")
        centres = pose.apply(self.planned_room_mm(seeds)) if seeds_room_mm is None else np.asarray(seeds_room_mm)
        out = []
        for s, c in zip(chosen, centres):
            axis = pose.rotation @ (self._room_from_lps @ s.axis_lps)
            out.append(_Marker(np.asarray(c, float), axis, s.length_mm, s.radius_mm, False, 1.0))
        return out

    def material_paths(self, imager: ImagerGeometry, pose: Pose) -> MaterialPaths:
        """Water and bone path lengths of every pixel of ``imager`` at ``pose``, mm."""
        return MaterialPaths(compute_drr(self.water_volume, imager, pose).astype(np.float64),
                             compute_drr(self.bone_volume, imager, pose).astype(np.float64))

    def render(
        self,
        pose: Pose | None = None,
        seed: int | np.random.Generator = 0,
        chain: ChainConfig | None = None,
        *,
        paths: Mapping[str, MaterialPaths] | None = None,
        seeds_room_mm: np.ndarray | None = None,
        previous: Mapping[str, np.ndarray] | None = None,
        seeds: Sequence[Seed] | None = None,
    ) -> tuple[StereoFrames, dict[str, ChainFrame]]:
        """A stereo pair of raw frames at ``pose`` and the chain's stages per imager.

        Parameters
        ----------
        pose : Pose, optional
            Patient pose, room frame (CONVENTIONS); identity when omitted.
        seed : int or numpy Generator
            Noise generator.
        chain : ChainConfig, optional
            Overrides the simulator's chain.
        paths : mapping imager -> MaterialPaths, optional
            Anatomy path lengths from another projector (at ``pose``).
        seeds_room_mm : (N, 3) array, optional
            Seed centres in the room (e.g. a migrated seed); default the planned ones moved by ``pose``.
        previous : mapping imager -> signal, optional
            The previous frame's ``ChainFrame.signal`` per imager (lag).
        seeds : sequence of Seed, optional
            Gold cylinders (planning-CT LPS) instead of the phantom's seeds (the anatomy has none).

        Returns
        -------
        (StereoFrames, dict imager -> ChainFrame)
            Truth with the seed centres in room mm and ``(col, row)`` pixels.
        """
        pose = Pose.identity() if pose is None else pose
        if not isinstance(pose, Pose):
            raise SimulationError(f"render needs a Pose, got {type(pose).__name__}")
        chain = self.chain if chain is None else chain
        rng = _rng(seed)
        markers = self.markers(pose, seeds_room_mm, seeds)
        seeds_room = np.array([m.centre_mm for m in markers]).reshape(-1, 3)
        frames, stages, seeds_px = {}, {}, {}
        for im in self.geometry.imagers:
            p = paths[im.name] if paths is not None else self.material_paths(im, pose)
            windows = _seed_windows(im, markers, chain.seed_supersampling)
            prev = None if previous is None else previous.get(im.name)
            stages[im.name] = render_chain_frame(p, im, chain, self.maps(im.name, chain), rng, windows, prev)
            frames[im.name] = stages[im.name].raw
            seeds_px[im.name] = im.project(seeds_room) if len(seeds_room) else np.zeros((0, 2))
        dead = {n: np.zeros((0, 2), np.int64) for n in frames}
        names = tuple(s.name for s in (self.phantom.seeds if seeds is None else seeds))
        truth = FrameTruth(pose, chain.i0, chain.spectrum.mean_energy_kev, names,
                           seeds_room, seeds_px, dead, dead)
        return StereoFrames(frames, truth), stages
