"""The treatment plan a service configuration's ``[plan]`` section names: loaded by one set of rules.

The service's processors (:mod:`spineguide.tracking.service.processing`), its start-up check
(:mod:`spineguide.tracking.service.config_file`), the setup export and the console all load the plan through
:func:`load_treatment_plan`, so they cannot disagree on what the plan is (a DICOM folder, or CT + fiducials files).
"""

from __future__ import annotations

from .config import PlanConfig

__all__ = ["load_treatment_plan", "plan_flat_fields", "anatomy_roi", "level_rois"]


def load_treatment_plan(plan: PlanConfig):
    """The :class:`spineguide.registration.plan.Plan` a ``[plan]`` section describes: a DICOM folder or CT + fiducials files."""
    from spineguide.registration.plan import load_dicom_plan, load_plan_files

    if plan.dicom is not None:
        return load_dicom_plan(plan.dicom, isocentre_lps_mm=plan.isocentre_lps_mm, target_roi=plan.target_roi)
    return load_plan_files(plan.ct, plan.isocentre_lps_mm, fiducials_path=plan.fiducials)


def plan_flat_fields(plan: PlanConfig) -> dict:
    """Panel gain/offset maps named in the plan's geometry file (its optional ``flat_field`` extension).

    Imager name -> :class:`spineguide.tracking.localisation.flatfield.FlatField`; empty when the file names none. Map paths are
    taken relative to the geometry file's folder (docs/FIDUCIALS.md section 7).
    """
    from ..localisation.flatfield import flat_fields_from_geometry_file

    return flat_fields_from_geometry_file(plan.geometry)


def anatomy_roi(plan: PlanConfig, treatment):
    """The anatomy method's region of interest: the plan's target ROI, else the ``roi_half_size_mm`` box
    (planning-CT LPS, around the isocentre)."""
    from spineguide.registration.anatomy import RegionOfInterest

    if treatment.target_roi is not None:
        return RegionOfInterest.from_mask(treatment.target_mask(), description=f"ROI '{treatment.target_roi}'")
    return RegionOfInterest.from_box(treatment.ct, treatment.isocentre_lps_mm, plan.roi_half_size_mm)


def level_rois(plan: PlanConfig, treatment) -> dict:
    """Per-level plans (``[plan] level_rois``): level name -> :class:`RegionOfInterest` of that vertebra's
    structure set ROI, cranial to caudal as listed (docs/PER_LEVEL.md)."""
    from spineguide.registration.anatomy import RegionOfInterest
    from spineguide.registration.errors import PlanError

    out = {}
    for name in plan.level_rois or ():
        if name not in treatment.rois:
            raise PlanError(f"[plan] level_rois: ROI {name!r} is not in the plan's structure set "
                            f"(ROIs: {sorted(treatment.rois)})")
        out[name] = RegionOfInterest.from_mask(treatment.rois[name], description=f"level '{name}'")
    if treatment.target_roi not in out:
        raise PlanError(f"[plan] level_rois {list(out)} must include the target ROI {treatment.target_roi!r}")
    return out
