"""spineguide.registration: CT volumes, DRRs, 2D/3D and point registration, poses.

Depends on :mod:`calibration` only, never on :mod:`tracking`.
"""

from __future__ import annotations

from spineguide.calibration._lazy import lazy_exports

#: Public name -> the submodule that defines it. Imported on first use (PEP 562), so that importing one
#: submodule (e.g. the CLI's errors) does not pull in numba, OpenCV, SciPy and SimpleITK.
_LAZY = {
    "hu_to_mu_per_mm": "attenuation",
    "linear_attenuation_per_mm": "attenuation",
    "AttenuationVolume": "drr",
    "PanelRegion": "drr",
    "compute_drr": "drr",
    "compute_drr_batch": "drr",
    "compute_drr_pose_derivatives": "drr",
    "PROJECTORS": "drr",
    "write_drr_images": "drr",
    "DRR_METADATA_PREFIX": "drr",
    "read_dicom_ct": "dicom_ct",
    "DRRError": "errors",
    "NotConvergedError": "errors",
    "PatientPositionError": "errors",
    "PoseError": "errors",
    "RegistrationError": "errors",
    "VolumeError": "errors",
    "VolumeFileError": "errors",
    "Correction": "pose",
    "CouchCorrection": "pose",
    "Pose": "pose",
    "RotationAxis": "pose",
    "reduce_to_couch": "pose",
    "CTVolume": "volume",
    "PatientPosition": "volume",
    "read_ct": "ctfile",
    "room_from_lps_matrix": "volume",
    "write_ct": "ctfile",
    "find_ct_seeds": "ct_seeds",
    "FiducialSet": "io",
    "read_fiducials": "io",
    "write_fiducials": "io",
    "PointRegistrationResult": "points",
    "SeedMigrationError": "points",
    "register_points": "points",
    "Plan": "plan",
    "PlanError": "plan",
    "load_dicom_plan": "plan",
    "load_plan_files": "plan",
    "MotionPrior": "motion_prior",
    "MotionPriorError": "errors",
    "target_covariance_mm2": "motion_prior",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
