"""The global stage: the neighbourhood matched by 2D shifts in each view, triangulated; the wrong-level check.

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np

from spineguide.calibration.geometry import ImagerGeometry

from ..drr import PanelRegion, compute_drr_batch
from ..errors import RegistrationError
from ..pose import Pose
from ..similarity import image_gradients
from .images import _parabola_offset, _smooth


class _GlobalSearch:
    """The global stage and the wrong-level check of :class:`AnatomyRegistration` (a part of it)."""

    # -------------------------------------------------------------- global stage
    def _context_scores(self, frame, im: ImagerGeometry, pose: Pose, centre: np.ndarray, b: int, volume,
                        search_mm: float, level_reach: float, counter) -> dict:
        """Gradient correlation of the context DRR at ``pose`` with the radiograph, as a function of 2D shift.

        The map covers shifts up to ``search_mm`` (mm at the isocentre) plus ``level_reach``
        vertebral levels along the spine. Returned shifts are in binned pixels relative to zero shift; ``along`` /
        ``across`` are the shift components along and across the projected spine, binned pixels.
        """
        cfg = self.config
        px_per_mm = im.magnification / float(np.mean(im.pixel_spacing_mm))
        c_px = im.project(centre)
        spine_px = im.project(centre + self._spine_dir_room) - c_px
        spine_px /= max(np.linalg.norm(spine_px), 1e-9)
        search_px = search_mm * px_per_mm
        level_px = self._level_spacing_mm * px_per_mm
        extra_c = search_px + abs(spine_px[0]) * level_reach * level_px
        extra_r = search_px + abs(spine_px[1]) * level_reach * level_px
        # The template keeps clear of the panel edges by the search extent, so that every
        # shift of the capture window (and one level either way) is scored.
        t = self._context_region(im, pose, b, (extra_c + b, extra_r + b))
        # Search window: the template box grown on every side, on the same bin grid.
        c0 = t.col0 - int(math.ceil(extra_c / b)) * b
        r0 = t.row0 - int(math.ceil(extra_r / b)) * b
        while c0 < 0:
            c0 += b
        while r0 < 0:
            r0 += b
        c1 = min(t.col0 + t.cols + int(math.ceil(extra_c / b)) * b, im.cols)
        r1 = min(t.row0 + t.rows + int(math.ceil(extra_r / b)) * b, im.rows)
        search = PanelRegion(r0, c0, (r1 - r0) // b * b, (c1 - c0) // b * b)
        drr = compute_drr_batch(volume, im, [pose], t, b, parallel=False)[0]
        counter[0] += 1
        sig = cfg.global_smoothing_sigma_px
        tx, ty = image_gradients(_smooth(drr, sig))
        fx, fy = image_gradients(_smooth(frame.binned_log(search, b), sig))
        if fx.shape[0] < tx.shape[0] or fx.shape[1] < tx.shape[1]:
            raise RegistrationError(f"imager '{im.name}': search window smaller than the ROI neighbourhood template")
        score = 0.5 * (cv2.matchTemplate(fx, tx, cv2.TM_CCOEFF_NORMED) + cv2.matchTemplate(fy, ty, cv2.TM_CCOEFF_NORMED))
        score = np.nan_to_num(score, nan=-1.0)
        zero = np.array([(t.col0 - c0) / b, (t.row0 - r0) / b])  # (col, row) of zero shift in `score`
        rr, cc = np.mgrid[0 : score.shape[0], 0 : score.shape[1]]
        dcol, drow = cc - zero[0], rr - zero[1]
        return {
            "score": score, "zero": zero, "dcol": dcol, "drow": drow, "c_px": c_px,
            "along": dcol * spine_px[0] + drow * spine_px[1], "across": dcol * spine_px[1] - drow * spine_px[0],
            "search": search_px / b, "level": level_px / b,
        }

    @staticmethod
    def _level_margin(m: dict, peak: tuple[int, int]) -> float:
        """Score at ``peak`` minus the best score one vertebral level up or down the spine from it."""
        pr, pc = peak
        along = m["along"] - m["along"][pr, pc]
        across = m["across"] - m["across"][pr, pc]
        level = m["level"]
        band = (np.abs(np.abs(along) - level) <= 0.4 * level) & (np.abs(across) <= max(m["search"], 2.0))
        best_out = float(m["score"][band].max()) if np.any(band) else -1.0
        return float(m["score"][pr, pc]) - best_out

    def _global_stage(self, logs, start: Pose, centre: np.ndarray, counter) -> tuple[np.ndarray, float]:
        """3D translation from per-view 2D correlation search of the ROI's neighbourhood; level margin (min over views).

        Each view keeps its best local maxima (``global_candidates``); of every pair of them, one per
        view, the pairs whose back-projected rays meet within ``global_max_ray_distance_mm`` are one 3D
        position, and the one with the highest summed score wins. A view whose best peak is a false
        match (a rib crossing, a neighbour's pedicle) then loses to a slightly lower peak the other
        view agrees with. With no consistent pair, each view's best peak is used (the refinement and
        the quality checks judge the result).
        """
        cfg = self.config
        b = cfg.global_binning
        names = self.geometry.names
        maps, peaks, pixels_start = {}, {}, {}
        for name in names:
            im = self.geometry[name]
            m = self._context_scores(logs[name], im, start, centre, b, self._context, cfg.search_range_mm, 1.0, counter)
            score = m["score"]
            inside = (np.abs(m["dcol"]) <= m["search"]) & (np.abs(m["drow"]) <= m["search"])
            masked = np.where(inside, score, -np.inf).astype(np.float32)
            local = (masked == cv2.dilate(masked, np.ones((5, 5), np.uint8))) & inside
            order = np.argsort(-masked[local])[: cfg.global_candidates]
            rr, cc = np.nonzero(local)
            found = []
            h, w = score.shape
            for pr, pc in zip(rr[order], cc[order]):
                sub = np.array([pc, pr], dtype=np.float64)
                # Sub-pixel peak: a parabola through the peak and its two neighbours, per axis.
                if 0 < pc < w - 1:
                    sub[0] += _parabola_offset(score[pr, pc - 1], score[pr, pc], score[pr, pc + 1])
                if 0 < pr < h - 1:
                    sub[1] += _parabola_offset(score[pr - 1, pc], score[pr, pc], score[pr + 1, pc])
                found.append(((int(pr), int(pc)), float(score[pr, pc]), m["c_px"] + (sub - m["zero"]) * b))
            if not found:
                raise RegistrationError(f"imager '{name}': no correlation peak in the global search window")
            maps[name], peaks[name], pixels_start[name] = m, found, m["c_px"]
        tri_from = self.geometry.triangulate({n: pixels_start[n][None] for n in names})
        combos = list(itertools.product(*(range(len(peaks[n])) for n in names)))
        tri = self.geometry.triangulate({n: np.array([peaks[n][c[k]][2] for c in combos]) for k, n in enumerate(names)})
        total = np.array([sum(peaks[n][c[k]][1] for k, n in enumerate(names)) for c in combos])
        consistent = tri.ray_distance_mm <= cfg.global_max_ray_distance_mm
        best = int(np.argmax(np.where(consistent, total, -np.inf))) if consistent.any() else combos.index((0,) * len(names))
        chosen = combos[best]
        margins = [self._level_margin(maps[n], peaks[n][chosen[k]][0]) for k, n in enumerate(names)]
        translation = tri.points_mm[best] - tri_from.points_mm[0]
        bound = cfg.translation_bound_mm
        return np.clip(translation, -bound, bound), float(np.min(margins))

    def _final_level_margin(self, logs, pose: Pose, centre: np.ndarray, counter) -> float:
        """Wrong-level check at the result: the neighbourhood's match at ``pose`` against one level away (min over views).

        At twice the global stage's resolution, the context DRR at the found pose is matched to
        each radiograph; the best score within a few pixels of zero shift is compared with the best
        one a vertebral level up or down the spine. Positive: no neighbouring level fits better.
        """
        cfg = self.config
        b = max(cfg.global_binning // 2, 1)
        volume = self._context_fine
        margins = []
        for name in self.geometry.names:
            m = self._context_scores(logs[name], self.geometry[name], pose, centre, b, volume, 1.0, 1.4, counter)
            near = np.hypot(m["dcol"], m["drow"]) <= max(m["search"], 1.5)
            pr, pc = np.unravel_index(int(np.argmax(np.where(near, m["score"], -np.inf))), m["score"].shape)
            margins.append(self._level_margin(m, (pr, pc)))
        return float(np.min(margins))
