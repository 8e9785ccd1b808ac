"""The resolution pyramid: downsampled ROI volumes, the neighbourhood volume, and each level's views.

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import scipy.ndimage

from ..attenuation import hu_to_mu_per_mm, linear_attenuation_per_mm
from ..drr import AttenuationVolume, compute_drr_batch
from ..errors import RegistrationError
from ..pose import Pose
from ..volume import CTVolume
from .config import AnatomyConfig, PyramidLevel
from .images import _View, _block_mean, _features, _smooth


def _context_volume(ct: CTVolume, room_from_index: np.ndarray, mask: np.ndarray, cfg: "AnatomyConfig") -> AttenuationVolume:
    """Attenuation in excess of water in a cube of ``context_half_size_mm`` around the ROI centre, tapered at the faces."""
    spacing_kji = np.asarray(ct.spacing_mm, dtype=np.float64)[::-1]
    centre = np.argwhere(mask).mean(axis=0)
    half = cfg.context_half_size_mm / spacing_kji
    lo = [max(int(np.floor(c - h)), 0) for c, h in zip(centre, half)]
    hi = [min(int(np.ceil(c + h)) + 1, n) for c, h, n in zip(centre, half, ct.hu.shape)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    mu = hu_to_mu_per_mm(ct.hu[sl], cfg.imaging_energy_kev, cfg.ct_energy_kev)
    mu_water = np.float32(linear_attenuation_per_mm("water", cfg.imaging_energy_kev))
    mu = np.maximum(mu - mu_water, np.float32(0.0))
    # Raised-cosine taper at every face: a hard crop would draw the box outline into the DRR.
    for axis, (n, sp) in enumerate(zip(mu.shape, spacing_kji)):
        ramp = max(cfg.context_taper_mm / sp, 1.0)
        d = np.minimum(np.arange(n) + 0.5, n - 0.5 - np.arange(n))
        w = np.where(d < ramp, 0.5 - 0.5 * np.cos(np.pi * np.clip(d / ramp, 0.0, 1.0)), 1.0).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = n
        mu *= w.reshape(shape)
    shift = np.eye(4)
    shift[:3, 3] = [lo[2], lo[1], lo[0]]
    return AttenuationVolume(mu, room_from_index @ shift)


def _pyramid_volume(volume: AttenuationVolume, factor: int, prefilter_mm: float) -> AttenuationVolume:
    """Block-mean downsampled volume, then band-limited by a 3D Gaussian of ``prefilter_mm`` sigma."""
    out = volume.downsampled(factor)
    if prefilter_mm <= 0:
        return out
    spacing_mm = np.linalg.norm(out.room_from_index[:3, :3], axis=0)  # along i, j, k
    sigma_vox = [prefilter_mm / spacing_mm[2], prefilter_mm / spacing_mm[1], prefilter_mm / spacing_mm[0]]
    # Pad with zeros so the blur spreads beyond the (tightly cropped) ROI box instead of being cut by it.
    pad = [int(math.ceil(3.0 * s)) for s in sigma_vox]
    mu = np.pad(out.mu_per_mm, [(p, p) for p in pad])
    mu = scipy.ndimage.gaussian_filter(mu, sigma_vox, mode="constant", cval=0.0, truncate=3.0)
    shift = np.eye(4)
    shift[:3, 3] = [-pad[2], -pad[1], -pad[0]]
    return AttenuationVolume(np.maximum(mu, 0.0).astype(np.float32), out.room_from_index @ shift)


class _PyramidLevels:
    """The levels of :class:`AnatomyRegistration`: volumes and per-view working data (a part of it)."""

    def _level_volume(self, level: PyramidLevel) -> AttenuationVolume:
        if level.context:
            return self._context_levels[level.volume_factor]
        return self._volumes[(level.volume_factor, float(level.prefilter_mm))]

    def _prepare_level(self, logs, pose: Pose, level: PyramidLevel, names=None, pixel_mask=None) -> list[_View] | None:
        """Per-view working data at ``pose`` for every imager of the geometry, or only ``names`` (one view: the
        one-view registration); None when a view's region or mask is too small."""
        b = level.binning
        volume = self._level_volume(level)
        views = []
        for name in self.geometry.names if names is None else names:
            im = self.geometry[name]
            if level.context:
                try:
                    region = self._context_region(im, pose, b)
                except RegistrationError:
                    return None
            else:
                region, _, _ = self._region(im, pose, b)
            if region is None:
                return None
            prefilter_px = level.prefilter_mm * im.magnification / float(np.mean(im.pixel_spacing_mm))
            frame = _smooth(logs[name].binned_log(region, b, prefilter_px), level.smoothing_sigma_px)
            drr = compute_drr_batch(volume, im, [pose], region, b, parallel=False, projector=self.config.projector)[0]
            support = drr > 1e-6
            grown = cv2.dilate(support.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            grown[:2, :] = grown[-2:, :] = False
            grown[:, :2] = grown[:, -2:] = False
            beyond = self._beyond_ct_ends(im, pose, region, b)
            if beyond.any():
                # grown by the smoothing's reach: a feature there mixes in the pixels left out
                reach = 2 * int(math.ceil(2.0 * level.smoothing_sigma_px)) + 3
                beyond = cv2.dilate(beyond.astype(np.uint8), np.ones((reach, reach), np.uint8)).astype(bool)
                grown &= ~beyond
            if pixel_mask is not None and name in pixel_mask:
                grown &= _block_mean(np.asarray(pixel_mask[name], dtype=np.float32), region, b) > 0.5
            if np.count_nonzero(grown) < 16:
                return None
            views.append(
                _View(im, region, frame, grown, _features(frame, grown, self.config.metric), self._pixel_at_iso_mm(im, b))
            )
        return views

    def _per_view(self, fn, views):
        """``[fn(v) for v in views]``, the views on threads of their own (the DRR kernels release the GIL)."""
        if self._pool is None or len(views) < 2:
            return [fn(v) for v in views]
        return list(self._pool.map(fn, views))
