"""Settings of fiducial localisation: :class:`FiducialConfig` and the plan-guided faint search's
:class:`FaintSearchConfig` (mm in the room, px on the panel, degrees).

Part of :mod:`spineguide.tracking.localisation.fiducials` (see its docstring for the method).
"""

from __future__ import annotations

from dataclasses import dataclass, field


from spineguide.calibration.foundation import checked_integer, checked_number
from spineguide.registration.points import PointRegistrationConfig

from ..errors import FiducialConfigError
from .detection import DetectionConfig

__all__ = ["FaintSearchConfig", "FiducialConfig"]


@dataclass(frozen=True, slots=True)
class FaintSearchConfig:
    """The plan-guided joint search for seeds a stand-alone detector misses (``spineguide.tracking.localisation.constellation``).

    Runs when the clean-frame detector leaves a planned seed unfound (or
    finds none): the planned constellation is searched as a whole in both
    views' matched-filter evidence maps, then each seed is verified by a
    sub-pixel fit where the pose puts it, or (a migration) by a strong fit
    within ``migration_search_mm`` of that place.

    Attributes
    ----------
    enabled : bool
    joint_search : bool
        False: only tracking's first step runs (the seeds verified where the
        prior pose puts them, a few tens of ms); the evidence-map
        constellation search (0.1-0.5 s) never does, and without a prior pose
        nothing of this search runs. The live service's setting.
    snr_cap : float
        Evidence of one seed view (the standardised response in units of
        the region's 99.5th percentile: bone clutter grows with the dose) is
        capped at this, so that no single bright structure outweighs a seed.
    translation_range_mm, translation_step_mm : float
        Translation grid of the constellation search around the plan (the
        prior pose when tracking), mm.
    tracking_range_mm : float
        Translation range around a prior pose, mm.
    local_reach_mm : float
        Half-size of the cube searched around each seed of a translation
        hypothesis (rotation, the grid's step), mm.
    pool_mm : float
        Max-pooling radius of the translation search (absorbs rotation), mm
        at the isocentre.
    smooth_mm : float
        Gaussian sigma of the maps of the 6-DoF refinement, mm at the isocentre.
    hypotheses : int
        Translation maxima refined and verified.
    seed_min_snr : float
        Fitted SNR (amplitude over its standard error) of a seed at its
        predicted place, in each view.
    near_mm : float
        Largest distance of that fit from the predicted place, mm at the isocentre.
    anchor_min_snr : float
        Two seeds of a constellation must reach this fitted SNR in both views
        (the pose is then not made of noise fitted into place).
    moved_min_snr : float
        Fitted SNR in both views of a seed found away from its predicted place
        (a migration claim needs a seed that stands out on its own).
    migration_search_mm : float
        Half-size of the cube searched around the predicted place of a seed
        not seen there, mm.
    two_seed_min_snr : float
        Fitted SNR each seed of a two-seed solution needs in both views (two
        seeds agree on a single distance, weak evidence).
    two_seed_max_view_ratio : float
        Largest ratio of a seed's fitted SNRs in its two views in a two-seed
        solution (one gold seed's two shadows: measured at most 2.9 over
        ~840 seeds of the realistic benchmark; a real seed in one view paired
        with clutter on its epipolar line in the other: 5-7).
    search_margin_mm : float
        The region analysed: a sphere around the planned seeds, this much
        larger than their extent and the translation range, mm.
    """

    enabled: bool = True
    joint_search: bool = True
    snr_cap: float = 2.0
    translation_range_mm: float = 12.0
    translation_step_mm: float = 1.0
    tracking_range_mm: float = 3.0
    local_reach_mm: float = 4.0
    pool_mm: float = 2.0
    smooth_mm: float = 0.4
    hypotheses: int = 3
    seed_min_snr: float = 5.0
    near_mm: float = 1.0
    anchor_min_snr: float = 6.0
    moved_min_snr: float = 8.0
    migration_search_mm: float = 3.5
    two_seed_min_snr: float = 8.0
    two_seed_max_view_ratio: float = 4.0
    search_margin_mm: float = 8.0

    def __post_init__(self) -> None:
        for name in ("snr_cap", "translation_range_mm", "translation_step_mm", "tracking_range_mm",
                     "local_reach_mm", "pool_mm", "smooth_mm", "seed_min_snr", "near_mm", "anchor_min_snr",
                     "moved_min_snr", "migration_search_mm", "two_seed_min_snr", "search_margin_mm",
                     "two_seed_max_view_ratio"):
            value = getattr(self, name)
            checked_number(value, FiducialConfigError,
                           f"faint search config: {name} must be a positive finite number, got {value!r}",
                           minimum=0.0, exclusive_minimum=True)
        if self.two_seed_max_view_ratio < 1.0:
            raise FiducialConfigError("faint search config: two_seed_max_view_ratio is a ratio of the larger to the "
                                      f"smaller SNR, at least 1, got {self.two_seed_max_view_ratio!r}")
        checked_integer(self.hypotheses, FiducialConfigError,
                        f"faint search config: hypotheses must be a positive integer, got {self.hypotheses!r}",
                        minimum=1)
        for name in ("enabled", "joint_search"):
            if not isinstance(getattr(self, name), bool):
                raise FiducialConfigError(f"faint search config: {name} must be a bool, got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class FiducialConfig:
    """Limits of fiducial localisation (mm in the room, px on the panel, degrees).

    Attributes
    ----------
    detection : DetectionConfig
    registration : PointRegistrationConfig
        Holds the migration limit (default 1.5 mm).
    max_epipolar_px : float
        Largest distance of a detection from the epipolar line of its partner
        (the larger of the two directions), pixels.
    max_ray_distance_mm : float
        Largest skew distance between the two back-projected rays of a pair, mm.
    association_tolerance_mm : float
        Largest change of an inter-seed distance accepted while assigning
        candidates to planned seeds; wider than the migration limit, so that a
        migrated seed is still assigned and then named by the rigid-body check.
    prior_radius_mm : float
        With a prior pose, largest distance of a candidate from its predicted
        room position, mm.
    max_rotation_deg : float
        Largest total rotation of a plausible patient pose, degrees; a
        labelling that needs more is rejected.
    max_fre_mm : float
        Largest fiducial registration error of an acceptable result, mm.
    swap_margin_mm : float
        How much lower the FRE of one labelling must be to prefer it when both
        are plausible and their corrections differ, mm.
    agreement_mm : float
        Two labellings whose poses move every planned seed to within this
        distance of each other give the same answer, mm.
    faint : FaintSearchConfig
        The plan-guided second search (low dose, scatter).
    refit_below_snr : float
        Tracking: a detection of the tracking windows below this matched-filter
        SNR is re-centred by the seed-shadow box fit (one start at its
        orientation): a faint seed's weighted centroid is pulled by bone
        structure (clinic frames: SNR 8-20, up to 2.2 px), a bright one's is
        not (clean frames: SNR 28-60).
    refit_max_shift_px : float
        Largest move of such a refit from the centroid; beyond it the fit has
        left the seed and the centroid stands, px.
    """

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    registration: PointRegistrationConfig = field(default_factory=PointRegistrationConfig)
    max_epipolar_px: float = 2.0
    max_ray_distance_mm: float = 1.0
    association_tolerance_mm: float = 5.0
    prior_radius_mm: float = 10.0
    max_rotation_deg: float = 10.0
    max_fre_mm: float = 1.0
    swap_margin_mm: float = 0.3
    agreement_mm: float = 0.2
    faint: FaintSearchConfig = field(default_factory=FaintSearchConfig)
    refit_below_snr: float = 25.0
    refit_max_shift_px: float = 2.5

    def __post_init__(self) -> None:
        if not isinstance(self.faint, FaintSearchConfig):
            raise FiducialConfigError(f"fiducial config: faint must be a FaintSearchConfig, got {self.faint!r}")
        if not isinstance(self.detection, DetectionConfig):
            raise FiducialConfigError(f"fiducial config: detection must be a DetectionConfig, got {self.detection!r}")
        if not isinstance(self.registration, PointRegistrationConfig):
            raise FiducialConfigError(
                f"fiducial config: registration must be a PointRegistrationConfig, got {self.registration!r}"
            )
        for name in ("max_epipolar_px", "max_ray_distance_mm", "association_tolerance_mm", "prior_radius_mm",
                     "max_rotation_deg", "max_fre_mm", "swap_margin_mm", "agreement_mm", "refit_below_snr",
                     "refit_max_shift_px"):
            value = getattr(self, name)
            checked_number(value, FiducialConfigError,
                           f"fiducial config: {name} must be a positive finite number, got {value!r}",
                           minimum=0.0, exclusive_minimum=True)
