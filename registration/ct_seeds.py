"""Gold seeds found automatically in a planning CT, listed for confirmation (LPS mm).

Seeds are the densest things in a CT: gold reconstructs at the top of the HU
range (often clipped at the scanner's maximum, 3071 HU or more), far above
cortical bone (~1500-2000 HU). Candidates are the connected components
(26-connectivity) of voxels at or above ``threshold_hu`` (default 2500 HU)
whose volume fits a seed after the scanner's blur, and which are compact: the
bright streaks a metal object throws across an axial slice are long and thin
and are rejected by their extent along the principal axis, not by their
brightness. Each candidate's centre is the centroid of its region grown by
one voxel, weighted by the HU above the median of the shell around it, in
DICOM patient coordinates (LPS, mm). The list is for a person to confirm,
never used unseen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import CTSeedError
from .io import FiducialSet
from .volume import CTVolume

__all__ = ["CTSeedConfig", "CTSeedCandidate", "CTSeedError", "find_ct_seeds", "candidates_to_fiducials"]


@dataclass(frozen=True, slots=True)
class CTSeedConfig:
    """Limits of the CT seed search.

    Attributes
    ----------
    threshold_hu : float
        Voxels at or above this are metal candidates (gold, not bone).
    min_volume_mm3, max_volume_mm3 : float
        Component volume range. A 0.8-1.2 mm x 3-5 mm gold seed is 1.5-6 mm^3;
        blur and partial volume in a 1-3 mm CT grid make its over-threshold
        region between a fraction of a voxel's worth and a few times larger.
    max_length_mm : float
        Largest extent along the principal axis (``sqrt(12 lambda_1)``, the
        length of a uniform rod with that second moment, voxel size included).
        Seeds are <= 5-6 mm even blurred; streaks run for centimetres.
    max_elongation : float
        Largest ratio of principal extents (first over second); a seed is at
        most ~5:1 in a fine grid, a one-voxel-thick streak far more.
    """

    threshold_hu: float = 2500.0
    min_volume_mm3: float = 0.2
    max_volume_mm3: float = 60.0
    max_length_mm: float = 9.0
    max_elongation: float = 6.0

    def __post_init__(self) -> None:
        for name in ("threshold_hu", "min_volume_mm3", "max_volume_mm3", "max_length_mm", "max_elongation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise CTSeedError(f"CT seed search: {name} must be a positive finite number, got {value!r}")
        if self.min_volume_mm3 >= self.max_volume_mm3:
            raise CTSeedError(
                f"CT seed search: min_volume_mm3 ({self.min_volume_mm3}) must be below max_volume_mm3 "
                f"({self.max_volume_mm3})"
            )


@dataclass(frozen=True, slots=True)
class CTSeedCandidate:
    """One compact metal blob in the planning CT.

    Attributes
    ----------
    centre_lps_mm : (3,) array
        Centroid weighted by the HU excess over the surroundings, DICOM
        patient coordinates (LPS), mm.
    volume_mm3 : float
        Volume of the over-threshold component, mm^3.
    peak_hu : float
        Highest HU in the component.
    length_mm : float
        Extent along the principal axis, mm.
    elongation : float
        Ratio of the first to the second principal extent.
    n_voxels : int
    """

    centre_lps_mm: np.ndarray
    volume_mm3: float
    peak_hu: float
    length_mm: float
    elongation: float
    n_voxels: int

    def __post_init__(self) -> None:
        c = np.array(self.centre_lps_mm, dtype=np.float64)
        c.setflags(write=False)
        object.__setattr__(self, "centre_lps_mm", c)


def find_ct_seeds(ct: CTVolume, config: CTSeedConfig = CTSeedConfig()) -> tuple[CTSeedCandidate, ...]:
    """Find gold-seed candidates in a planning CT.

    Parameters
    ----------
    ct : CTVolume
        Planning CT in HU.
    config : CTSeedConfig

    Returns
    -------
    tuple of CTSeedCandidate
        Compact blobs at the top of the HU range, brightest first; empty when
        there are none. Rejected components (too small, too large, streaks)
        are not listed.

    Raises
    ------
    CTSeedError
        If ``ct`` is not a CTVolume.
    """
    if not isinstance(ct, CTVolume):
        raise CTSeedError(f"find_ct_seeds needs a CTVolume, got {type(ct).__name__}")
    hu = ct.hu
    mask = hu >= config.threshold_hu
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return ()
    idx = np.arange(1, n + 1)
    kk, jj, ii = np.nonzero(labels)
    lab = labels[kk, jj, ii]
    # Voxel positions in mm along the grid axes (the grid is orthonormal up to
    # spacing, so moments here equal moments in LPS up to a rotation).
    pos = np.stack([ii, jj, kk], axis=1) * ct.spacing_mm
    count = np.bincount(lab, minlength=n + 1)[1:]
    mean = np.stack([np.bincount(lab, pos[:, a], n + 1)[1:] for a in range(3)], axis=1) / count[:, None]
    second = np.empty((n, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            m = np.bincount(lab, pos[:, a] * pos[:, b], n + 1)[1:] / count - mean[:, a] * mean[:, b]
            second[:, a, b] = second[:, b, a] = m
    # Each voxel is a box, not a point: add its own second moment (s^2 / 12).
    second += np.diag(ct.spacing_mm**2 / 12.0)[None]
    evals = np.clip(np.linalg.eigvalsh(second), 0.0, None)  # ascending
    extent = np.sqrt(12.0 * evals)
    length = extent[:, 2]
    elongation = extent[:, 2] / np.maximum(extent[:, 1], 1e-9)
    volume = count * float(np.prod(ct.spacing_mm))
    peak = np.asarray(ndimage.maximum(hu, labels, idx), dtype=np.float64)
    keep = (
        (volume >= config.min_volume_mm3)
        & (volume <= config.max_volume_mm3)
        & (length <= config.max_length_mm)
        & (elongation <= config.max_elongation)
    )
    boxes = ndimage.find_objects(labels)
    order = [k for k in np.argsort(-peak) if keep[k]]
    out = []
    for k in order:  # loop over the few accepted blobs, not over voxels
        ijk = _refined_centre_ijk(hu, labels, k + 1, boxes[k])
        out.append(CTSeedCandidate(ct.index_to_lps(ijk), float(volume[k]), float(peak[k]), float(length[k]),
                                   float(elongation[k]), int(count[k])))
    return tuple(out)


_BALL = ndimage.generate_binary_structure(3, 3)


def _refined_centre_ijk(hu: np.ndarray, labels: np.ndarray, label: int, box: tuple) -> np.ndarray:
    """Sub-voxel centre ``(i, j, k)`` of one blob: its grown region weighted by HU above the surroundings.

    The over-threshold voxels alone can sit in one slice while the seed's
    blur spreads into the next; the region grown by one voxel, weighted by
    the excess over the median of the shell around it, keeps that information
    (and a uniform bone or tissue background cancels).
    """
    lo = [max(sl.start - 3, 0) for sl in box]
    hi = [min(sl.stop + 3, n) for sl, n in zip(box, hu.shape)]
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = labels[sub] == label
    grown = ndimage.binary_dilation(mask, _BALL)
    shell = ndimage.binary_dilation(grown, _BALL) & ~grown
    vals = hu[sub].astype(np.float64)
    base = float(np.median(vals[shell])) if shell.any() else 0.0
    w = np.where(grown, np.clip(vals - base, 0.0, None), 0.0)
    kk, jj, ii = np.indices(w.shape)
    total = w.sum()
    return np.array([(w * ii).sum() / total + lo[2], (w * jj).sum() / total + lo[1], (w * kk).sum() / total + lo[0]])


def candidates_to_fiducials(candidates: tuple[CTSeedCandidate, ...], source: str = "<CT search>") -> FiducialSet:
    """Confirmed candidates as a :class:`FiducialSet` named ``F1, F2, ...`` (LPS mm)."""
    if len(candidates) == 0:
        raise CTSeedError(f"{source}: no seed candidates to make fiducials of")
    return FiducialSet(
        tuple(f"F{i + 1}" for i in range(len(candidates))),
        np.array([c.centre_lps_mm for c in candidates]),
        source,
    )
