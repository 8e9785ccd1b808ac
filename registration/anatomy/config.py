"""The settings of an anatomy registration: the pyramid levels and everything else, each checked.

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

from dataclasses import dataclass

from spineguide.calibration.foundation import checked_integer, checked_number

from ..attenuation import DEFAULT_CT_ENERGY_KEV, DEFAULT_IMAGING_ENERGY_KEV
from ..drr import PROJECTORS
from ..errors import AnatomyConfigError
from ..similarity import Similarity


# --------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class PyramidLevel:
    """One resolution level of the refinement.

    Attributes
    ----------
    volume_factor : int
        ROI volume downsampled by this factor per axis (block mean).
    binning : int
        DRR and radiograph pixels are ``binning x binning`` panel pixels.
    smoothing_sigma_px : float
        Gaussian smoothing of both images before comparison, binned pixels.
    max_iterations : int
        Levenberg-Marquardt iterations at this level.
    supersampling : int
        Rays per binned pixel and axis of the ROI DRR (averaged, like the
        detector averages a bin): removes the aliasing of thin cortical
        shells that makes the similarity rough under sub-voxel motion.
    prefilter_mm : float
        Gaussian band limit (sigma, mm) applied to the ROI and background
        volumes in 3D and, scaled to the panel, to the radiograph before
        binning: with both band-limited, one ray per binned pixel no longer
        aliases thin cortical shells (which makes the similarity rough and
        biased under sub-voxel motion).
    context : bool
        Match the anatomy around the ROI (``AnatomyConfig.context_half_size_mm``)
        instead of the ROI: a long lever arm that captures start rotations
        of several degrees which a single vertebra's DRR barely shows (roll
        about the spine); meant for a coarse first level.
    """

    volume_factor: int
    binning: int
    smoothing_sigma_px: float
    max_iterations: int
    supersampling: int = 1
    prefilter_mm: float = 0.0
    context: bool = False

    def __post_init__(self) -> None:
        for name in ("volume_factor", "binning", "max_iterations", "supersampling"):
            v = getattr(self, name)
            checked_integer(v, AnatomyConfigError, f"PyramidLevel.{name} must be a positive integer, got {v!r}", minimum=1)
        for name in ("smoothing_sigma_px", "prefilter_mm"):
            v = getattr(self, name)
            checked_number(v, AnatomyConfigError, f"PyramidLevel.{name} must be >= 0, got {v!r}", minimum=0.0)
        if self.binning % self.supersampling:
            raise AnatomyConfigError(
                f"PyramidLevel.supersampling {self.supersampling} must divide the binning {self.binning}"
            )


_OPTIMISABLE = (Similarity.GRADIENT_CORRELATION, Similarity.NCC)


#: Damping increases tried per Levenberg-Marquardt iteration before the Jacobian is renewed.
_MAX_DAMPING_TRIES = 8


#: A result is final only when the background model was drawn within this fraction of its
#: redraw distance from it.
_FINAL_REDRAW_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class AnatomyConfig:
    """Settings of the anatomy registration (defaults: ``docs/ANATOMY_REGISTRATION.md``).

    Distances in mm at the isocentre, angles in degrees, pixels in panel
    pixels unless a name says binned.
    """

    #: Similarity optimised (least-squares form): gradient correlation or NCC.
    metric: Similarity = Similarity.GRADIENT_CORRELATION
    #: Coarse-to-fine levels of the full (wide capture range) registration.
    #: The full-resolution ROI at binning 8 does most of the fine work (a quarter of the rays of
    #: binning 4: the exactly rendered background is the costliest part); binning 4 finishes, with room for
    #: the slow roll crawl of low-dose frames (real CT at i0 2000: 83% -> 96% accepted with 20 iterations, not 10).
    levels: tuple[PyramidLevel, ...] = (
        PyramidLevel(2, 8, 1.0, 10, context=True), PyramidLevel(1, 8, 1.0, 10), PyramidLevel(1, 4, 1.0, 20),
    )
    #: Fit each view's contrast scale in the refinement's residual (``rho v - u``, variable projection;
    #: ``refine._scaled_residual``) instead of ``v - u``: whole Gauss-Newton steps at low dose. Not at context levels.
    fit_contrast_scale: bool = True
    #: Levels of tracking mode (start within ~2 mm / 1 deg of the answer). Binning 5 (with the first-order background
    #: below): real CT through the clinic-like chain needs it (binning 8 missed 0.12 / 0.25 mm; docs/BENCHMARKS.md).
    tracking_levels: tuple[PyramidLevel, ...] = (PyramidLevel(1, 5, 1.0, 12),)
    #: Effective energy of the kV beam used for the DRRs, keV.
    imaging_energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV
    #: Effective energy of the planning CT, keV.
    ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV
    #: ROI mask grown by this many voxels (keeps partial-volume bone edges).
    roi_dilation_voxels: int = 1
    #: Add the DRR of everything outside the ROI (re-rendered once per level at the
    #: level's start pose) so overlapping anatomy in the radiograph is matched too.
    background: bool = True
    #: The background volume is downsampled by at least this factor (block mean): it is a
    #: long ray through the whole CT, the costliest DRR, and it only has to carry the
    #: overlapping anatomy's edges, not the ROI's.
    background_volume_factor: int = 1
    #: Coarsen the background per level to about the level's binned pixel at the isocentre
    #: (per axis, never below ``background_volume_factor``; see ``_background_key``).
    background_match_pixel: bool = True
    #: With ``background_match_pixel``: the block size aimed at, in binned pixels at the isocentre
    #: (1.5: thoracolumbar phantom 520 -> 384 ms, the same mTRE; 2: no faster; the 3 mm real CT unchanged).
    background_block_px: float = 1.5
    #: How the background's pose derivatives are made in the full registration and in tracking
    #: mode: "flow" (no more DRRs; the derivative is the image gradient times the panel motion
    #: of a point on each ray at the ROI centre's depth, exact to first order for translations,
    #: approximate for rotations, which move anatomy off that depth along the ray; a redraw
    #: costs one DRR per view, so it is redrawn at a tighter distance, ``background_lever_mm``)
    #: or "difference" (six more DRRs per view, forward differences), or "exact": no linear
    #: model at all, the background is rendered (Joseph) at every pose the optimiser evaluates and
    #: differentiated exactly with the ROI (a patient's background reaches 150-200 mm from the ROI,
    #: where a linear model in the rotation fails within a fraction of a degree).
    background_derivatives: str = "exact"
    tracking_background_derivatives: str = "exact"
    #: Redraw the background when the pose has moved this far (binned pixels at the
    #: isocentre, at the ROI centre; rotations counted at the ROI's RMS radius, or, with
    #: flow derivatives, at ``background_lever_mm``).
    background_redraw_px: float = 1.0
    #: With "exact" background derivatives: a residual whose pose lies within this distance (mm, and the same arc at
    #: the ROI radius in degrees) of the last derivative pass uses the background's first-order model from that pass
    #: instead of rendering it. 0: always render. 0.3: the same accuracy, 10-30 % faster (docs/BENCHMARKS.md).
    background_taylor_mm: float = 0.3
    background_lever_mm: float = 60.0
    #: Margin around the projected ROI box in each panel region, mm at the isocentre.
    region_margin_mm: float = 4.0
    #: Half width of the global 2D search window, mm at the isocentre.
    search_range_mm: float = 14.0
    #: Global stage: correlation peaks kept per view (local maxima, best first) for the joint stereo choice.
    global_candidates: int = 6
    #: Global stage: largest skew distance between the two views' back-projected ROI centres for a pair of
    #: peaks to be one 3D position, mm (the start's rotation, up to 4 deg, moves a peak ~1 mm).
    global_max_ray_distance_mm: float = 4.0
    #: Binning and volume factor of the global stage.
    global_binning: int = 8
    global_volume_factor: int = 2
    global_smoothing_sigma_px: float = 1.0
    #: The global stage (and the wrong-level check) matches a DRR of the anatomy in a cube of
    #: this half size (mm) around the ROI centre: a single vertebra matches its neighbours
    #: almost as well as itself, the neighbourhood (skull base, ribs, changing vertebra
    #: sizes) does not repeat one level away. Larger blurs more under the start rotation.
    context_half_size_mm: float = 60.0
    #: The context volume fades to zero over this distance at its box faces (cosine taper,
    #: mm), so the crop leaves no box outline in its DRR.
    context_taper_mm: float = 10.0
    #: Results whose ROI centre moved along the spine by more than this fraction of the
    #: level spacing from the start are refused as a possible wrong level.
    max_level_fraction: float = 0.6
    #: Vertebral level spacing for the wrong-level check when the ROI does not know it, mm.
    level_spacing_mm: float = 25.0
    #: Finite-difference step of the pose derivatives, binned pixels at the isocentre.
    fd_step_px: float = 0.5
    #: Line-integral model of the ROI DRRs (``spineguide.registration.drr.PROJECTORS``): "joseph"
    #: (slice-interpolating, smooth in the pose, the model the analytic Jacobian differentiates)
    #: or "siddon" (the voxel-constant volume's exact integral, drawn in slice steps where rays
    #: run nearly parallel to thick slices).
    projector: str = "joseph"
    #: Pose derivatives of the ROI DRRs: "central" (central differences, 12 DRRs per view) or
    #: "analytic" (one pass of the Joseph projector's exact derivatives per view; smooth in the
    #: pose, they describe the DRR over the optimiser's steps, as the differences do).
    jacobian: str = "analytic"
    #: Convergence: last step below both, mm and degrees (about the ROI centre).
    tolerance_mm: float = 0.05
    tolerance_deg: float = 0.05
    #: The optimiser may move at most this far from the start pose, per axis.
    translation_bound_mm: float = 20.0
    rotation_bound_deg: float = 8.0
    # ---- refusal thresholds (quality.ok)
    #: Lowest acceptable final similarity in every view.
    min_similarity: float = 0.3
    #: Largest acceptable residual 2D shift of a single view at the joint optimum, mm at the isocentre.
    max_view_shift_mm: float = 0.5
    #: Largest acceptable curvature-based standard deviation, mm / degrees (about the ROI centre).
    max_std_mm: float = 0.3
    max_std_deg: float = 0.3
    #: Smallest fraction of the projected ROI box that must fall on each panel.
    min_roi_on_panel: float = 0.9
    #: Largest fraction of saturated (or zero-signal) pixels in the ROI's panel region.
    max_saturated_fraction: float = 0.5
    #: Raw level at or above which a pixel counts as saturated; None: the dtype's maximum
    #: for integer frames, the frame's own maximum (when repeated) for float frames.
    saturation_level: float | None = None
    # ---- one view (register_one_view)
    #: Levels of the one-view registration (started at the motion prior's mean). Binning 8: one view gains nothing in
    #: target error from binning 5 (real-CT abdomen p95 0.55 mm both) and takes 1.7x the time (77 -> 131 ms median).
    one_view_levels: tuple[PyramidLevel, ...] = (PyramidLevel(1, 8, 1.0, 12),)
    #: Largest acceptable prior chi-square of a one-view result, ``(x - x_prior)^T C^-1 (x - x_prior)`` over the six
    #: pose parameters: 22.46 is chi-square(6) at 0.999, a result the prior calls a 1-in-1000 event is refused.
    one_view_max_prior_chi2: float = 22.46
    #: Half width (binned pixels) of the lag window over which the image residual's spatial correlation is summed
    #: (Bartlett-weighted) for the one-view covariance; ~4 sigma of the smoothing plus the gradient's pixel.
    one_view_correlation_lag_px: int = 4
    #: Systematic error of the image's in-plane position of the ROI centre that no residual statistic shows (the
    #: model's own bias: planning-CT sampling, projector, spectrum), 1 sigma per in-plane axis, mm; added to the
    #: one-view covariance across the view's ray. 0.1 mm: the stereo tracking registration's p95 target error on the
    #: real-CT simple-chain set (0.104 mm, docs/BENCHMARKS.md) taken as a one-sigma figure.
    one_view_model_error_mm: float = 0.1

    def __post_init__(self) -> None:
        if self.metric not in _OPTIMISABLE:
            raise AnatomyConfigError(
                f"metric must be one of {[m.value for m in _OPTIMISABLE]} (the least-squares forms), got {self.metric!r}"
            )
        if self.projector not in PROJECTORS:
            raise AnatomyConfigError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.jacobian not in ("central", "analytic"):
            raise AnatomyConfigError(f"jacobian must be 'central' or 'analytic', got {self.jacobian!r}")
        for name in ("background_derivatives", "tracking_background_derivatives"):
            if getattr(self, name) not in ("flow", "difference", "exact"):
                raise AnatomyConfigError(
                    f"{name} must be 'flow', 'difference' or 'exact', got {getattr(self, name)!r}"
                )
        for name in ("fit_contrast_scale", "background", "background_match_pixel"):
            if not isinstance(getattr(self, name), bool):
                raise AnatomyConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("levels", "tracking_levels", "one_view_levels"):
            levels = tuple(getattr(self, name))
            if not levels or not all(isinstance(lv, PyramidLevel) for lv in levels):
                raise AnatomyConfigError(f"{name} must be a non-empty tuple of PyramidLevel, got {levels!r}")
            object.__setattr__(self, name, levels)
        positive = (
            "imaging_energy_kev", "ct_energy_kev", "search_range_mm", "level_spacing_mm", "fd_step_px",
            "background_redraw_px", "background_lever_mm", "background_block_px", "global_max_ray_distance_mm",
            "tolerance_mm", "tolerance_deg", "translation_bound_mm", "rotation_bound_deg", "max_view_shift_mm",
            "max_std_mm", "max_std_deg", "context_taper_mm", "context_half_size_mm", "max_level_fraction",
            "one_view_max_prior_chi2",
        )
        for name in positive:
            v = getattr(self, name)
            checked_number(v, AnatomyConfigError, f"{name} must be a positive number, got {v!r}", minimum=0.0,
                           exclusive_minimum=True)
        for name in ("region_margin_mm", "global_smoothing_sigma_px", "one_view_model_error_mm", "background_taylor_mm"):
            v = getattr(self, name)
            checked_number(v, AnatomyConfigError, f"{name} must be >= 0, got {v!r}", minimum=0.0)
        for name in ("roi_dilation_voxels", "one_view_correlation_lag_px"):
            v = getattr(self, name)
            checked_integer(v, AnatomyConfigError, f"{name} must be a non-negative integer, got {v!r}", minimum=0)
        for name in ("global_binning", "global_volume_factor", "background_volume_factor", "global_candidates"):
            v = getattr(self, name)
            checked_integer(v, AnatomyConfigError, f"{name} must be a positive integer, got {v!r}", minimum=1)
        for name in ("min_similarity", "min_roi_on_panel", "max_saturated_fraction"):
            v = getattr(self, name)
            checked_number(v, AnatomyConfigError, f"{name} must lie in [0, 1], got {v!r}", minimum=0.0, maximum=1.0)
        if self.saturation_level is not None:
            checked_number(self.saturation_level, AnatomyConfigError,
                           f"saturation_level must be positive or None, got {self.saturation_level!r}", minimum=0.0,
                           exclusive_minimum=True)
