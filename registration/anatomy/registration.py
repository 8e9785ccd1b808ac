"""The public anatomy registration: :class:`AnatomyRegistration` (prepared once per CT and ROI) and
:func:`register_anatomy` (one shot).

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.ndimage

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry

from .._blas import single_blas_thread
from ..attenuation import hu_to_mu_per_mm, linear_attenuation_per_mm
from ..drr import AttenuationVolume, PanelRegion
from ..errors import RegistrationError, RoiError
from ..pose import Pose, rotation_matrix as _rotation_matrix
from ..similarity import RegistrationFrameError, transmission
from ..volume import CTVolume
from .background import _Background
from .config import AnatomyConfig
from .global_search import _GlobalSearch
from .images import _Frame
from .levels import _PyramidLevels, _context_volume, _pyramid_volume
from .one_view import _OneView
from .quality import _Acceptance
from .refine import _Refinement
from .result import AnatomyQuality, AnatomyResult, QualityReason, _frozen_map
from .roi import RegionOfInterest

log = logging.getLogger(__name__)


class AnatomyRegistration(_PyramidLevels, _Background, _GlobalSearch, _Refinement, _Acceptance, _OneView):
    """Prepared stereo anatomy registration of one planning CT and ROI.

    Building it converts the CT to ROI, neighbourhood and background
    attenuation volumes for every level (done once); :meth:`register` then
    registers any number of frame pairs, :meth:`register_one_view` a single
    view against a motion prior (:mod:`.one_view`). It owns a small thread pool (one
    worker per imager) on which each view's DRR batches run; :meth:`register`
    keeps no state between calls, so any thread may call it, also
    concurrently.

    Parameters
    ----------
    ct : CTVolume
        Planning CT (HU, LPS).
    isocentre_lps_mm : (3,) sequence
        Plan isocentre, planning-CT LPS mm.
    geometry : StereoGeometry
        Imagers, room frame.
    roi : RegionOfInterest
        On the CT grid.
    config : AnatomyConfig

    Raises
    ------
    RoiError
        ROI grid does not match the CT.
    """

    def __init__(
        self,
        ct: CTVolume,
        isocentre_lps_mm: Sequence[float],
        geometry: StereoGeometry,
        roi: RegionOfInterest,
        config: AnatomyConfig | None = None,
    ) -> None:
        self.config = AnatomyConfig() if config is None else config
        if not isinstance(roi, RegionOfInterest):
            raise RoiError(f"roi must be a RegionOfInterest, got {type(roi).__name__}")
        if roi.mask.shape != ct.hu.shape:
            raise RoiError(f"ROI '{roi.description}': mask shape {roi.mask.shape} does not match the CT {ct.hu.shape}")
        self.geometry = geometry
        self.roi = roi
        # One worker per view: the views' DRR batches run side by side (numba kernels release
        # the GIL). Shared by concurrent register() calls, which the executor allows.
        self._pool = ThreadPoolExecutor(max_workers=max(len(geometry.names), 1), thread_name_prefix="anatomy-view")
        cfg = self.config
        room_from_index = ct.room_from_index(isocentre_lps_mm)
        mask = roi.mask
        if cfg.roi_dilation_voxels:
            mask = scipy.ndimage.binary_dilation(mask, iterations=cfg.roi_dilation_voxels)
        # Crop first, then convert: only the ROI's box is converted to attenuation.
        idx = np.nonzero(mask)
        lo = [max(int(ix.min()) - 1, 0) for ix in idx]
        hi = [int(ix.max()) + 2 for ix in idx]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        mu = hu_to_mu_per_mm(ct.hu[sl], cfg.imaging_energy_kev, cfg.ct_energy_kev)
        mu_water = np.float32(linear_attenuation_per_mm("water", cfg.imaging_energy_kev))
        excess = np.maximum(mu - mu_water, np.float32(0.0))
        shift = np.eye(4)
        shift[:3, 3] = [lo[2], lo[1], lo[0]]
        base = AttenuationVolume(excess, room_from_index @ shift).masked(mask[sl])
        all_levels = cfg.levels + cfg.tracking_levels + cfg.one_view_levels
        keys = {(lv.volume_factor, float(lv.prefilter_mm)) for lv in all_levels}
        self._volumes = {key: _pyramid_volume(base, *key) for key in sorted(keys)}
        context = _context_volume(ct, room_from_index, mask, cfg)
        self._context = context.downsampled(cfg.global_volume_factor)
        self._context_fine = context.downsampled(max(cfg.global_volume_factor // 2, 1))
        self._context_levels = {
            lv.volume_factor: context.downsampled(lv.volume_factor) for lv in all_levels if lv.context
        }
        self._backgrounds: dict[tuple[tuple[int, int, int], float], AttenuationVolume] = {}
        self._ct_spacing_ijk_mm = np.linalg.norm(room_from_index[:3, :3], axis=0)
        if cfg.background:
            # Everything the ROI volume leaves out: full attenuation outside the mask,
            # the water baseline inside it; ROI DRR + background DRR = DRR of the whole CT.
            full = hu_to_mu_per_mm(ct.hu, cfg.imaging_energy_kev, cfg.ct_energy_kev)
            inside = np.zeros(ct.hu.shape, dtype=bool)
            inside[sl] = mask[sl]
            np.minimum(full, mu_water, out=full, where=inside)
            bg = AttenuationVolume(full, room_from_index)
            del full, inside
            bg_keys = {self._background_key(lv) for lv in all_levels if not lv.context}
            self._backgrounds = {key: _pyramid_volume(bg, *key) for key in sorted(bg_keys)}
        # ROI points (room, perfect setup) for the rotation centre and the panel regions.
        kji = np.argwhere(roi.mask)
        pts = kji[:, ::-1].astype(np.float64) @ room_from_index[:3, :3].T + room_from_index[:3, 3]
        self.roi_centre_room_mm = pts.mean(axis=0)
        self._roi_radius_mm = max(float(np.sqrt(np.mean(np.sum((pts - self.roi_centre_room_mm) ** 2, axis=1)))), 5.0)
        ni, nj, nk = base.mu_per_mm.shape[::-1]
        corners = np.array([[i, j, k] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
        self._roi_corners_room_mm = corners @ base.room_from_index[:3, :3].T + base.room_from_index[:3, 3]
        ctx = self._context
        ni, nj, nk = ctx.mu_per_mm.shape[::-1]
        corners = np.array([[i, j, k] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
        self._context_corners_room_mm = corners @ ctx.room_from_index[:3, :3].T + ctx.room_from_index[:3, 3]
        self._level_spacing_mm = roi.level_spacing_mm or cfg.level_spacing_mm
        # The CT's box (index frame) and its superior axis: rays that leave the box through its
        # superior or inferior face cross patient anatomy the CT does not hold (a patient does not
        # end where the CT does), so those panel pixels are left out of the similarity.
        self._index_from_room = np.linalg.inv(room_from_index)
        self._ct_shape_ijk = np.array(ct.hu.shape[::-1], dtype=np.float64)
        self._ct_axial_axis = int(np.argmax(np.abs(np.linalg.solve(ct.lps_from_index[:3, :3], [0.0, 0.0, 1.0]))))
        # Direction of the spine in the room (CT superior axis at perfect setup).
        sup = room_from_index[:3, :3] @ np.linalg.solve(ct.lps_from_index[:3, :3], [0.0, 0.0, 1.0])
        self._spine_dir_room = sup / np.linalg.norm(sup)

    # ----------------------------------------------------------------- helpers
    def _pose(self, x: np.ndarray, start: Pose, centre: np.ndarray) -> Pose:
        """Start pose followed by ``x`` = (translation mm, rotation deg about ``centre``)."""
        r = _rotation_matrix(x[3:])
        delta = Pose(r, centre + x[:3] - r @ centre)
        return delta.compose(start)

    def _region(self, imager: ImagerGeometry, pose: Pose, binning: int, extra_px: float = 0.0) -> tuple[PanelRegion | None, float, np.ndarray]:
        """Panel region around the projected ROI box; fraction of that box on the panel; unclipped box."""
        px = imager.project(pose.apply(self._roi_corners_room_mm))
        margin = self.config.region_margin_mm * imager.magnification / float(np.min(imager.pixel_spacing_mm))
        lo = np.floor(px.min(axis=0) - margin - extra_px)
        hi = np.ceil(px.max(axis=0) + margin + extra_px)
        box = np.array([lo[0], lo[1], hi[0], hi[1]])
        c0, r0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        c1, r1 = min(int(hi[0]), imager.cols), min(int(hi[1]), imager.rows)
        area = float((hi[0] - lo[0]) * (hi[1] - lo[1]))
        on = max(c1 - c0, 0) * max(r1 - r0, 0) / area if area > 0 else 0.0
        rows = (r1 - r0) // binning * binning
        cols = (c1 - c0) // binning * binning
        if rows < 8 * binning or cols < 8 * binning:
            return None, on, box
        return PanelRegion(r0, c0, rows, cols), on, box

    def _context_region(self, imager: ImagerGeometry, pose: Pose, binning: int, keep_clear_px=(0.0, 0.0)) -> PanelRegion:
        """Panel region of the projected context box, ``keep_clear_px`` (cols, rows) inside the panel, on the ``binning`` grid."""
        px = imager.project(pose.apply(self._context_corners_room_mm))
        ec, er = int(math.ceil(keep_clear_px[0])), int(math.ceil(keep_clear_px[1]))
        c0, r0 = max(int(np.floor(px[:, 0].min())), ec), max(int(np.floor(px[:, 1].min())), er)
        c1 = min(int(np.ceil(px[:, 0].max())), imager.cols - ec)
        r1 = min(int(np.ceil(px[:, 1].max())), imager.rows - er)
        rows, cols = (r1 - r0) // binning * binning, (c1 - c0) // binning * binning
        if rows < 8 * binning or cols < 8 * binning:
            raise RegistrationError(f"imager '{imager.name}': the ROI's neighbourhood is off the panel")
        return PanelRegion(r0, c0, rows, cols)

    def _beyond_ct_ends(self, imager: ImagerGeometry, pose: Pose, region: PanelRegion, binning: int) -> np.ndarray:
        """Binned pixels of ``region`` whose ray leaves the planning CT's box through its superior or
        inferior face (bool, ``[row, col]`` on the binned grid), the patient at ``pose`` (room frame).

        Such a ray crosses, in the patient, anatomy past the CT's end that no DRR of the CT holds.
        """
        rows, cols = region.rows // binning, region.cols // binning
        cc = region.col0 + np.arange(cols) * binning + (binning - 1) / 2.0
        rr = region.row0 + np.arange(rows) * binning + (binning - 1) / 2.0
        grid = np.stack(np.meshgrid(cc, rr), axis=-1).reshape(-1, 2)
        to_index = self._index_from_room @ pose.inverse().matrix
        src = to_index[:3, :3] @ imager.source_mm + to_index[:3, 3]
        ends = imager.pixel_to_room(grid) @ to_index[:3, :3].T + to_index[:3, 3]
        d = ends - src
        lo, hi = -0.5, self._ct_shape_ijk - 0.5
        t_in, t_out = np.zeros(len(d)), np.ones(len(d))
        with np.errstate(divide="ignore", invalid="ignore"):
            for ax in range(3):
                if ax == self._ct_axial_axis:
                    continue
                a = (lo - src[ax]) / d[:, ax]
                b = (hi[ax] - src[ax]) / d[:, ax]
                parallel = d[:, ax] == 0
                inside = (src[ax] >= lo) & (src[ax] <= hi[ax])
                a = np.where(parallel, -np.inf if inside else np.inf, a)
                b = np.where(parallel, np.inf if inside else -np.inf, b)
                t_in = np.maximum(t_in, np.minimum(a, b))
                t_out = np.minimum(t_out, np.maximum(a, b))
        ax = self._ct_axial_axis
        k_in, k_out = src[ax] + t_in * d[:, ax], src[ax] + t_out * d[:, ax]
        crosses = t_in < t_out
        beyond = crosses & ((np.minimum(k_in, k_out) < lo) | (np.maximum(k_in, k_out) > hi[ax]))
        return beyond.reshape(rows, cols)

    def _pixel_at_iso_mm(self, imager: ImagerGeometry, binning: int) -> float:
        return binning * float(np.mean(imager.pixel_spacing_mm)) / imager.magnification

    # ---------------------------------------------------------------- register
    @single_blas_thread
    def register(
        self,
        frames: Mapping[str, np.ndarray],
        i0: float | Mapping[str, float] | None = None,
        initial_pose: Pose | None = None,
        tracking: bool = False,
        pixel_mask: Mapping[str, np.ndarray] | None = None,
    ) -> AnatomyResult:
        """Register one stereo pair of raw kV frames.

        Parameters
        ----------
        frames : mapping imager name -> (rows, cols) array
            Raw detector signal (bone dark), one frame per imager of the geometry.
        i0 : float or mapping imager -> float, optional
            Unattenuated level(s); estimated per frame if omitted.
        initial_pose : Pose, optional
            Start pose (room frame); identity (perfect setup) if omitted.
        tracking : bool
            Start from ``initial_pose`` (a previous result, motion since then
            within ~2 mm / 1 degree), skip the global stage and use
            ``config.tracking_levels``.
        pixel_mask : mapping imager name -> (rows, cols) bool array, optional
            Panel pixels the comparison may use (default: all); a binned pixel
            is used when most of its panel pixels are (the per-level
            registration's hook, docs/PER_LEVEL.md).

        Returns
        -------
        AnatomyResult

        Raises
        ------
        RegistrationFrameError
            Missing or extra imager, wrong frame size, bad pixel values or i0.
        """
        t_start = time.monotonic()
        cfg = self.config
        names = self.geometry.names
        if set(frames) != set(names):
            raise RegistrationFrameError(f"frames for imagers {sorted(frames)} given; the geometry has {sorted(names)}")
        logs: dict[str, _Frame] = {}
        raw_frames: dict[str, np.ndarray] = {}
        for name in names:
            im = self.geometry[name]
            raw = np.asarray(frames[name])
            if raw.shape != (im.rows, im.cols):
                raise RegistrationFrameError(
                    f"frame '{name}': shape {raw.shape}, imager '{name}' has {im.rows}x{im.cols} pixels")
            view_i0 = i0.get(name) if isinstance(i0, Mapping) else i0
            if isinstance(i0, Mapping) and name not in i0:
                raise RegistrationFrameError(f"frame '{name}': no i0 given for this imager (i0 given for {sorted(i0)})")
            logs[name] = _Frame(*transmission(raw, view_i0, name))
            raw_frames[name] = raw
        start = Pose.identity() if initial_pose is None else initial_pose
        if not isinstance(start, Pose):
            raise RegistrationError(f"initial_pose must be a Pose, got {type(start).__name__}")
        centre = start.apply(self.roi_centre_room_mm)
        counter = [0]
        reasons: list[QualityReason] = []

        # ROI on the panel and saturation, at the start pose.
        roi_on, sat = {}, {}
        for name in names:
            im = self.geometry[name]
            region, on, _ = self._region(im, start, 1)
            roi_on[name] = on
            sat[name] = self._saturated_fraction(raw_frames[name], region) if region is not None else 1.0
        if min(roi_on.values()) < cfg.min_roi_on_panel:
            reasons.append(QualityReason.ROI_OFF_PANEL)
        if max(sat.values()) > cfg.max_saturated_fraction:
            reasons.append(QualityReason.SATURATED)
        if reasons:
            return self._refused(start, reasons, roi_on, sat, t_start, tracking)

        x = np.zeros(6)
        level_margin = None
        if not tracking:
            x[:3], _ = self._global_stage(logs, start, centre, counter)
        levels = cfg.tracking_levels if tracking else cfg.levels
        iterations = 0
        converged = False
        final = None
        for level in levels:
            views = self._prepare_level(logs, self._pose(x, start, centre), level, pixel_mask=pixel_mask)
            if views is None:
                return self._refused(start, [QualityReason.ROI_OFF_PANEL], roi_on, sat, t_start, tracking)
            mode = cfg.tracking_background_derivatives if tracking else cfg.background_derivatives
            x, its, converged, final = self._refine(views, level, x, start, centre, counter, mode)
            iterations += its
        pose = self._pose(x, start, centre)
        if not tracking:
            # Wrong level: a neighbouring level fits the radiographs better at the result, or the
            # result is most of a level along the spine from the start (the capture range holds
            # set-up errors, not level errors: a neighbour may have taken the target's place).
            level_margin = self._final_level_margin(logs, pose, centre, counter)
            along_mm = abs(float(x[:3] @ (start.rotation @ self._spine_dir_room)))
            if level_margin < 0 or along_mm > cfg.max_level_fraction * self._level_spacing_mm:
                reasons.append(QualityReason.WRONG_LEVEL)
        quality = self._quality(final, x, converged, reasons, roi_on, sat, level_margin)
        elapsed_ms = (time.monotonic() - t_start) * 1000.0
        log.debug("anatomy registration: %s in %.1f ms, %d DRRs", quality.reason.value, elapsed_ms, counter[0])
        return AnatomyResult(
            pose, pose.to_correction(), quality.similarity, quality, iterations, counter[0], elapsed_ms, bool(tracking)
        )

    def _refused(self, start, reasons, roi_on, sat, t_start, tracking) -> AnatomyResult:
        names = self.geometry.names
        nan3 = (math.nan, math.nan, math.nan)
        q = AnatomyQuality(
            False, reasons[0], tuple(reasons), _frozen_map({n: math.nan for n in names}),
            _frozen_map({}), _frozen_map({n: math.nan for n in names}), nan3, nan3,
            _frozen_map(roi_on), _frozen_map(sat), None, False, False,
        )
        return AnatomyResult(
            start, start.to_correction(), q.similarity, q, 0, 0, (time.monotonic() - t_start) * 1000.0, bool(tracking)
        )

    def _saturated_fraction(self, raw: np.ndarray, region: PanelRegion) -> float:
        sub = raw[region.row0 : region.row0 + region.rows, region.col0 : region.col0 + region.cols]
        level = self.config.saturation_level
        if level is None:
            if np.issubdtype(raw.dtype, np.integer):
                level = float(np.iinfo(raw.dtype).max)
            else:
                level = float(raw.max())
                if np.count_nonzero(raw >= level) < 0.001 * raw.size:
                    level = math.inf  # an unclipped float frame: its maximum is just its brightest pixel
        bad = (sub >= level) | (sub <= 0)
        return float(np.count_nonzero(bad)) / sub.size


def register_anatomy(
    ct: CTVolume,
    isocentre_lps_mm: Sequence[float],
    geometry: StereoGeometry,
    frames: Mapping[str, np.ndarray],
    roi: RegionOfInterest,
    i0: float | Mapping[str, float] | None = None,
    initial_pose: Pose | None = None,
    config: AnatomyConfig | None = None,
) -> AnatomyResult:
    """One-shot stereo anatomy registration (the ``spineguide register --method anatomy`` entry point).

    Parameters
    ----------
    ct : CTVolume
        Planning CT.
    isocentre_lps_mm : (3,) sequence
        Plan isocentre, planning-CT LPS mm.
    geometry : StereoGeometry
        Imagers, room frame.
    frames : mapping imager name -> (rows, cols) array
        Raw kV frames.
    roi : RegionOfInterest
        Build with :meth:`RegionOfInterest.from_labels`, ``from_mask`` or ``from_box``.
    i0 : float or mapping, optional
        Unattenuated level(s); estimated if omitted.
    initial_pose : Pose, optional
        Start pose; identity if omitted.
    config : AnatomyConfig, optional

    Returns
    -------
    AnatomyResult
        ``elapsed_ms`` includes the volume preparation.
    """
    t0 = time.monotonic()
    reg = AnatomyRegistration(ct, isocentre_lps_mm, geometry, roi, config)
    res = reg.register(frames, i0=i0, initial_pose=initial_pose)
    total_ms = (time.monotonic() - t0) * 1000.0
    return AnatomyResult(
        res.pose, res.correction, res.similarity, res.quality, res.iterations, res.drr_evaluations, total_ms, False
    )
