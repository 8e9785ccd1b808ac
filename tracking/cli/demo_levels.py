"""``spineguide demo``'s last step: per-level setup on a deformed spine (issue 18, docs/PER_LEVEL.md)."""

from __future__ import annotations

import time

import numpy as np

from spineguide.calibration.geometry import StereoGeometry
from spineguide.registration.pose import Pose

#: The deformed-spine demo: cervical phantom, target and neighbours, joint motion (deg, mm) and the set-up pose.
DEFORMED_LEVELS = ("C3", "C4", "C5")
DEFORMED_TARGET = "C4"
DEFORMED_MAX_DEG = 2.0
DEFORMED_MAX_MM = 0.5
DEFORMED_SETUP = Pose.from_six([1.5, -1.0, 0.8], [0.4, -0.3, 0.2])


def deformed_spine_levels(geometry: StereoGeometry, seed: int) -> tuple[list[list[str]], list[list[str]], str]:
    """Render the cervical phantom with its vertebrae moved each on its own, register every level, compare.

    Returns the per-level rows (truth and measured pose in the room, error), the inter-level rows (truth and
    measured flexion/extension, lateral bending, axial rotation) and a line on the discordance flag.
    """
    from spineguide.registration.anatomy import RegionOfInterest
    from spineguide.registration.anatomy.per_level import LevelRegistration, inter_level_motion

    from ..room.deform import deform_ct, levels_truth, random_level_deformation, upsample_for_grid
    from ..room.kv import DetectorModel
    from ..room.phantoms import cervical_phantom
    from ..room.realct import VERTEBRA_NAMES, CaseRenderer, LabelledCT

    phantom = cervical_phantom(target=DEFORMED_TARGET, seed=seed)
    verse = np.zeros(phantom.labels.shape, np.int16)  # the phantom's labels as VerSe numbers (C1 = 1 ...)
    for label, name in phantom.label_names.items():
        verse[phantom.labels == label] = VERTEBRA_NAMES.index(name) + 1
    planned = LabelledCT(phantom.planning_ct, verse, "cervical phantom labels")
    centroids = {n: planned.centroid_lps_mm(n) for n in DEFORMED_LEVELS}
    deformation = random_level_deformation(centroids, {n: planned.label_of(n) for n in DEFORMED_LEVELS},
                                           DEFORMED_TARGET, seed, DEFORMED_MAX_DEG, DEFORMED_MAX_MM)
    # On a grid of at most 1 mm (the slices refined): a moved vertebra resampled on the planning grid would carry
    # a blur of its own (docs/PER_LEVEL.md, "Third round").
    deformed = deform_ct(planned.ct, planned.labels, deformation, upsample=upsample_for_grid(planned.ct, 1.0))
    renderer = CaseRenderer(LabelledCT(deformed.ct, deformed.labels, "cervical phantom labels (deformed)"),
                            {"room": geometry}, DetectorModel(i0=20000.0), plan=planned)
    try:
        iso = renderer.isocentre_lps_mm(DEFORMED_TARGET)
        frames = renderer.frames(DEFORMED_TARGET, "room", DEFORMED_SETUP, "own", seed)
        i0 = renderer.i0
    finally:
        renderer.close()
    truth_doc = levels_truth(deformation, iso, planned.ct.patient_position, DEFORMED_SETUP, DEFORMED_SETUP, centroids)
    truth = {lv["name"]: Pose.from_six(lv["pose"]["translation_mm"], lv["pose"]["rotation_deg"])
             for lv in truth_doc["levels"]}
    rois = {n: RegionOfInterest.from_labels(planned.ct, verse, planned.label_of(n)) for n in DEFORMED_LEVELS}
    t0 = time.monotonic()
    reg = LevelRegistration(planned.ct, iso, geometry, rois, target=DEFORMED_TARGET)
    res = reg.register(frames, i0=i0)
    elapsed_s = time.monotonic() - t0

    def six(p: Pose) -> str:
        t, r = p.six()
        return " ".join(f"{v:+.2f}" for v in t) + " | " + " ".join(f"{v:+.2f}" for v in r)

    level_rows = []
    for lv in res.levels:
        tru = truth[lv.name]
        err = lv.pose.compose(tru.inverse())
        centre = reg.centre_room_mm(lv.name)
        mtre = float(np.linalg.norm(lv.pose.apply(centre) - tru.apply(centre)))
        level_rows.append([lv.name + (" (target)" if lv.name == res.target else ""), six(tru), six(lv.pose),
                           f"{mtre:.2f}", f"{err.angle_deg():.2f}", "ok" if lv.ok else lv.reason])
    inter_rows = []
    for m, (a, b) in zip(res.inter_level, zip(DEFORMED_LEVELS, DEFORMED_LEVELS[1:])):
        t = inter_level_motion(a, b, truth[a], truth[b], reg.centre_room_mm(a), planned.ct.patient_position)
        inter_rows.append([f"{a}/{b}",
                           f"{t.flexion_extension_deg:+.2f} / {m.flexion_extension_deg:+.2f}",
                           f"{t.lateral_bending_deg:+.2f} / {m.lateral_bending_deg:+.2f}",
                           f"{t.axial_rotation_deg:+.2f} / {m.axial_rotation_deg:+.2f}"])
    flag = (f"discordant: {'YES' if res.discordant else 'no'}" + (f" ({res.discordance_detail})" if res.discordant else "")
            + f"; every level registered in {elapsed_s:.1f} s (CT preparation included)")
    return level_rows, inter_rows, flag
