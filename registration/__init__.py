"""spineguide.registration: CT volumes, DRRs, 2D/3D and point registration, poses.

Depends on :mod:`calibration` only, never on :mod:`tracking`.
"""

from .attenuation import hu_to_mu_per_mm, linear_attenuation_per_mm
from .dicom_ct import read_dicom_ct
from .drr import (
    DRR_METADATA_PREFIX,
    PROJECTORS,
    AttenuationVolume,
    PanelRegion,
    compute_drr,
    compute_drr_batch,
    compute_drr_pose_derivatives,
    write_drr_images,
)
from .errors import (
    DRRError,
    NotConvergedError,
    PatientPositionError,
    PoseError,
    RegistrationError,
    VolumeError,
    VolumeFileError,
)
from .ct_seeds import find_ct_seeds
from .io import FiducialSet, read_fiducials, write_fiducials
from .points import PointRegistrationResult, SeedMigrationError, register_points
from .plan import Plan, PlanError, load_dicom_plan, load_plan_files
from .pose import Correction, CouchCorrection, Pose, RotationAxis, reduce_to_couch
from .volume import CTVolume, PatientPosition, read_ct, room_from_lps_matrix, write_ct

__all__ = [
    "hu_to_mu_per_mm",
    "linear_attenuation_per_mm",
    "AttenuationVolume",
    "PanelRegion",
    "compute_drr",
    "compute_drr_batch",
    "compute_drr_pose_derivatives",
    "PROJECTORS",
    "write_drr_images",
    "DRR_METADATA_PREFIX",
    "read_dicom_ct",
    "DRRError",
    "NotConvergedError",
    "PatientPositionError",
    "PoseError",
    "RegistrationError",
    "VolumeError",
    "VolumeFileError",
    "Correction",
    "CouchCorrection",
    "Pose",
    "RotationAxis",
    "reduce_to_couch",
    "CTVolume",
    "PatientPosition",
    "read_ct",
    "room_from_lps_matrix",
    "write_ct",
    "find_ct_seeds",
    "FiducialSet",
    "read_fiducials",
    "write_fiducials",
    "PointRegistrationResult",
    "SeedMigrationError",
    "register_points",
    "Plan",
    "PlanError",
    "load_dicom_plan",
    "load_plan_files",
]
