"""The region of interest of an anatomy registration: a mask on the planning-CT grid (labels, mask or box).

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import RoiError
from ..volume import CTVolume


# ------------------------------------------------------------------------------ ROI
@dataclass(frozen=True, slots=True)
class RegionOfInterest:
    """A 3D region of the planning CT on its voxel grid.

    Attributes
    ----------
    mask : (nk, nj, ni) bool, read-only
        True inside the ROI, on the CT's ``[k, j, i]`` grid.
    description : str
        What the ROI is, for messages (``"label 3 +-1"``, ``"box 40x40x30 mm"``).
    level_spacing_mm : float or None
        Distance between neighbouring vertebrae near the target (mm), if the
        ROI knows it (label ROIs); used by the wrong-level check.
    """

    mask: np.ndarray
    description: str = "mask"
    level_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        m = np.array(self.mask, dtype=bool)
        if m.ndim != 3:
            raise RoiError(f"ROI '{self.description}': mask must be 3D [k, j, i], got shape {m.shape}")
        if not np.any(m):
            raise RoiError(f"ROI '{self.description}': mask selects no voxel")
        m.setflags(write=False)
        object.__setattr__(self, "mask", m)
        if self.level_spacing_mm is not None:
            s = float(self.level_spacing_mm)
            if not math.isfinite(s) or s <= 0:
                raise RoiError(f"ROI '{self.description}': level spacing must be positive mm, got {s!r}")
            object.__setattr__(self, "level_spacing_mm", s)

    @classmethod
    def from_mask(cls, mask: np.ndarray, description: str = "mask") -> "RegionOfInterest":
        """Any non-zero voxel of a ``[k, j, i]`` array is inside."""
        return cls(np.asarray(mask) != 0, description)

    @classmethod
    def from_labels(
        cls, ct: CTVolume, labels: np.ndarray, target_label: int, neighbours: int = 0
    ) -> "RegionOfInterest":
        """The voxels labelled ``target_label`` (plus ``neighbours`` levels either side).

        Parameters
        ----------
        ct : CTVolume
            Planning CT; ``labels`` must share its grid.
        labels : (nk, nj, ni) int array
            Vertebra labels, consecutive integers along the spine.
        target_label : int
        neighbours : int
            0 for the target vertebra alone, 1 for target +-1 level.

        Raises
        ------
        RoiError
            Grid mismatch, negative ``neighbours`` or a target label absent.
        """
        lab = np.asarray(labels)
        if lab.shape != ct.hu.shape:
            raise RoiError(f"ROI labels: shape {lab.shape} does not match the CT {ct.hu.shape} ({ct.source})")
        if isinstance(neighbours, bool) or int(neighbours) != neighbours or neighbours < 0:
            raise RoiError(f"ROI labels: neighbours must be a non-negative integer, got {neighbours!r}")
        target = int(target_label)
        if not np.any(lab == target):
            present = sorted(int(v) for v in np.unique(lab) if v != 0)
            raise RoiError(f"ROI labels: label {target} not present (labels present: {present})")
        n = int(neighbours)
        mask = (lab >= target - n) & (lab <= target + n) & (lab != 0)

        def centre_lps(value: int) -> np.ndarray | None:
            idx = np.argwhere(lab == value)
            return None if idx.size == 0 else ct.index_to_lps(idx[:, ::-1].mean(axis=0))

        c0 = centre_lps(target)
        gaps = [float(np.linalg.norm(c - c0)) for c in (centre_lps(target - 1), centre_lps(target + 1)) if c is not None]
        desc = f"label {target}" + (f" +-{n}" if n else "")
        return cls(mask, desc, min(gaps) if gaps else None)

    @classmethod
    def from_box(
        cls, ct: CTVolume, centre_lps_mm: Sequence[float], half_size_mm: Sequence[float]
    ) -> "RegionOfInterest":
        """Voxels whose centres lie in an LPS-axis-aligned box (CT LPS mm, half sizes in mm)."""
        c = np.asarray(centre_lps_mm, dtype=np.float64)
        h = np.asarray(half_size_mm, dtype=np.float64)
        if c.shape != (3,) or h.shape != (3,) or not np.all(np.isfinite(c)) or not np.all(np.isfinite(h)):
            raise RoiError(f"ROI box: centre and half size must be three finite numbers each, got {c} and {h}")
        if np.any(h <= 0):
            raise RoiError(f"ROI box: half sizes must be positive mm, got {h.tolist()}")
        nk, nj, ni = ct.hu.shape
        kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        lps = ct.index_to_lps(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
        inside = np.all(np.abs(lps - c) <= h, axis=1).reshape(nk, nj, ni)
        desc = "box {:g}x{:g}x{:g} mm at LPS ({:g}, {:g}, {:g})".format(*(2 * h), *c)
        if not np.any(inside):
            raise RoiError(f"ROI {desc}: the box holds no voxel centre of the CT ({ct.source})")
        return cls(inside, desc)
