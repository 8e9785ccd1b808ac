"""The background (the CT outside the ROI) as a DRR linear in the pose, drawn and redrawn per level.

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import numpy as np

from ..drr import compute_drr_batch
from .config import PyramidLevel
from .images import _flow_derivatives


class _Background:
    """The background model of :class:`AnatomyRegistration` (a part of it)."""

    # ------------------------------------------------------------------ refinement
    def _background_key(self, level: PyramidLevel) -> tuple[tuple[int, int, int], float]:
        """Block-mean factors (i, j, k) and band limit of a level's background volume.

        At least ``max(level.volume_factor, config.background_volume_factor)`` per axis, and, with
        ``config.background_match_pixel``, as many voxels per block along an axis as fit in
        ``config.background_block_px`` of the level's binned pixels at the isocentre (rounded): finer
        background detail is averaged away by the detector bin and the smoothing anyway, and the
        background's rays are the costliest.
        """
        base = max(level.volume_factor, self.config.background_volume_factor)
        factors = [base] * 3
        if self.config.background_match_pixel:
            pixel_mm = min(self._pixel_at_iso_mm(self.geometry[n], level.binning) for n in self.geometry.names)
            block_mm = self.config.background_block_px * pixel_mm
            factors = [max(base, int(round(block_mm / s))) for s in self._ct_spacing_ijk_mm]
        return tuple(factors), float(level.prefilter_mm)

    def _linearise_background(self, views, level, x, steps, start, centre, counter, flow: bool) -> None:
        """Background DRR and its pose derivatives at ``x`` (a linear model in ``x``): forward
        differences (six more DRRs per view) or, with ``flow``, :func:`_flow_derivatives`."""
        volume = self._backgrounds[self._background_key(level)]
        if flow:
            pose = self._pose(x, start, centre)
            pivot = centre + x[:3]  # the rotation centre after the translation x[:3]

            def draw(v):
                img = compute_drr_batch(volume, v.imager, [pose], v.region, level.binning, parallel=False)[0]
                return img, _flow_derivatives(img, v.imager, v.region, level.binning, pivot)

            for v, (img, jac) in zip(views, self._per_view(draw, views)):
                counter[0] += 1
                v.bg0, v.bg_jac, v.x_bg = img, jac, x.copy()
            return
        poses = [self._pose(x, start, centre)]
        for p in range(6):
            xp = x.copy()
            xp[p] += steps[p]
            poses.append(self._pose(xp, start, centre))
        images = self._per_view(
            lambda v: compute_drr_batch(volume, v.imager, poses, v.region, level.binning, parallel=False), views
        )
        for v, img in zip(views, images):
            counter[0] += len(poses)
            v.bg0 = img[0]
            v.bg_jac = (img[1:] - img[0]) / steps.astype(np.float32)[:, None, None]
            v.x_bg = x.copy()
