"""Writing a virtual-room simulation to disk (what ``spineguide simulate`` produces).

Layout of ``out_dir``::

    ct.mha                 planning CT (HU, float32), patient position in its metadata
    target_mask.mha        target-vertebra mask (uint8) on the planning-CT grid
    geometry.json          kv-geometry/1
    fiducials.json         fiducials/1, planning-CT LPS mm (absent for a phantom without seeds)
    dicom/                 the same plan as DICOM: CT_NNNN.dcm, RS.dcm (RTSTRUCT), RP.dcm (RTPLAN)
    frames/pose_NNN_X.mha  one raw frame per imager per pose (uint16 or float32)
    truth.json             room-truth/1: per pose the pose, correction, seeds (room mm and px), i0

Frames carry their imager name and ``i0`` as metadata (``spineguide_imager``,
``spineguide_i0``) and the panel pixel spacing (mm) as their spacing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spineguide.calibration.geometry import StereoGeometry, default_stereo_geometry
from spineguide.calibration.io import write_geometry
from spineguide.calibration.jsonfile import write_json_document
from spineguide.registration.ctfile import write_ct
from spineguide.registration.io import FiducialSet, write_fiducials

from ..errors import TrackingError
from .dicom import write_dicom_plan
from .kv import DetectorModel, KVSimulator, StereoFrames
from .motion import random_setup_pose
from .phantoms import Phantom, cervical_phantom, thoracolumbar_phantom

__all__ = ["SimulationSummary", "write_simulation", "write_frame", "TRUTH_SCHEMA", "PHANTOMS"]

TRUTH_SCHEMA = "room-truth/1"

#: Phantom factories by the name the CLI uses.
PHANTOMS = {"thoracolumbar": thoracolumbar_phantom, "cervical": cervical_phantom}


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """What :func:`write_simulation` wrote.

    Attributes
    ----------
    out_dir : Path
    phantom : str
    n_poses : int
    files : tuple of Path
        Every file written, in order.
    isocentre_lps_mm : tuple of float
    elapsed_s : float
    """

    out_dir: Path
    phantom: str
    n_poses: int
    files: tuple[Path, ...]
    isocentre_lps_mm: tuple[float, float, float]
    elapsed_s: float


def write_frame(frame: np.ndarray, path: str | os.PathLike, imager_name: str, i0: float, pixel_spacing_mm) -> Path:
    """Write one raw frame (``image[row, col]``) as ``.mha`` with its imager and ``i0`` in the metadata."""
    p = Path(path)
    img = sitk.GetImageFromArray(np.ascontiguousarray(frame))
    row_sp, col_sp = (float(s) for s in pixel_spacing_mm)
    img.SetSpacing((col_sp, row_sp))
    img.SetMetaData("spineguide_imager", imager_name)
    img.SetMetaData("spineguide_i0", repr(float(i0)))
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(p), useCompression=True)
    return p


def _pose_truth(index: int, pair: StereoFrames, frame_files: dict[str, str]) -> dict:
    t = pair.truth
    return {
        "index": index,
        "pose": t.pose.to_json(),
        "correction": t.pose.to_correction().to_json(),
        "i0": t.i0,
        "seed_names": list(t.seed_names),
        "seeds_room_mm": t.seeds_room_mm.tolist(),
        "seeds_px": {k: v.tolist() for k, v in t.seeds_px.items()},
        "dead_px": {k: v.tolist() for k, v in t.dead_px.items()},
        "hot_px": {k: v.tolist() for k, v in t.hot_px.items()},
        "frames": frame_files,
    }


def write_simulation(
    out_dir: str | os.PathLike,
    phantom: str | Phantom = "thoracolumbar",
    n_poses: int = 1,
    *,
    seed: int = 0,
    geometry: StereoGeometry | None = None,
    detector: DetectorModel | None = None,
    energy_kev: float = 60.0,
    max_translation_mm: float = 10.0,
    max_rotation_deg: float = 3.0,
    progress=None,
) -> SimulationSummary:
    """Simulate ``n_poses`` stereo pairs of a phantom at seeded random setup errors and write everything.

    Parameters
    ----------
    out_dir : path
        Created if missing; existing files of the same names are replaced.
    phantom : str or Phantom
        ``"thoracolumbar"``, ``"cervical"`` (built with default arguments) or a built phantom.
    n_poses : int
        Number of stereo pairs (>= 1).
    seed : int
        Seeds the poses and the frame noise (pose ``i`` uses noise seed ``seed + 1 + i``).
    geometry : StereoGeometry, optional
        Default: :func:`spineguide.calibration.geometry.default_stereo_geometry`.
    detector : DetectorModel, optional
        Default :class:`DetectorModel` (``i0 = 20000``, uint16).
    energy_kev : float
        Effective imaging energy, keV.
    max_translation_mm, max_rotation_deg : float
        Each of the six pose numbers is uniform in ``[-max, +max]`` (room mm, degrees).
    progress : callable, optional
        Called as ``progress(done, total)`` after each pose (for the CLI).

    Returns
    -------
    SimulationSummary

    Raises
    ------
    TrackingError
        Unknown phantom name or a non-positive pose count.
    """
    start = time.monotonic()
    if isinstance(n_poses, bool) or not isinstance(n_poses, (int, np.integer)) or n_poses < 1:
        raise TrackingError(f"simulate: the number of poses must be a positive integer, got {n_poses!r}")
    if isinstance(phantom, str):
        if phantom not in PHANTOMS:
            raise TrackingError(f"simulate: unknown phantom {phantom!r} (known: {', '.join(PHANTOMS)})")
        phantom = PHANTOMS[phantom]()
    geometry = default_stereo_geometry() if geometry is None else geometry
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    files.append(write_ct(phantom.planning_ct, out / "ct.mha"))
    ct = phantom.planning_ct
    mask = sitk.GetImageFromArray(phantom.target_mask())
    mask.SetSpacing(tuple(float(s) for s in ct.spacing_mm))
    mask.SetOrigin(tuple(float(o) for o in ct.origin_lps_mm))
    mask.SetDirection(tuple(float(d) for d in ct.direction.ravel()))
    mask.SetMetaData("spineguide_label", phantom.target_name)
    sitk.WriteImage(mask, str(out / "target_mask.mha"), useCompression=True)
    files.append(out / "target_mask.mha")
    files.append(write_geometry(geometry, out / "geometry.json"))
    if phantom.seeds:
        seeds = FiducialSet(tuple(s.name for s in phantom.seeds), [s.centre_lps_mm for s in phantom.seeds])
        files.append(write_fiducials(seeds, out / "fiducials.json"))
    # The same plan as DICOM (CT series, RTSTRUCT with vertebrae and seed points, RTPLAN with the isocentre).
    files.append(write_dicom_plan(phantom, out / "dicom").out_dir)
    sim = KVSimulator(phantom, geometry, energy_kev=energy_kev, detector=detector)
    rng = np.random.default_rng(seed)
    poses = []
    for i in range(n_poses):
        pose = random_setup_pose(rng, max_translation_mm, max_rotation_deg)
        pair = sim.render(pose, seed=seed + 1 + i)
        names = {}
        for im in geometry.imagers:
            rel = f"frames/pose_{i:03d}_{im.name}.mha"
            files.append(write_frame(pair.frames[im.name], out / rel, im.name, pair.truth.i0, im.pixel_spacing_mm))
            names[im.name] = rel
        poses.append(_pose_truth(i, pair, names))
        if progress is not None:
            progress(i + 1, n_poses)
    truth = {
        "schema": TRUTH_SCHEMA,
        "phantom": phantom.name,
        "ct": "ct.mha",
        "geometry": "geometry.json",
        "fiducials": "fiducials.json",
        "target_mask": "target_mask.mha",
        "target_label": phantom.target_name,
        "isocentre_lps_mm": phantom.isocentre_lps_mm.tolist(),
        "patient_position": phantom.planning_ct.patient_position.value,
        "energy_kev": sim.energy_kev,
        "seeds": [s.to_json() for s in phantom.seeds],
        "poses": poses,
    }
    files.append(write_json_document(truth, out / "truth.json"))
    return SimulationSummary(
        out, phantom.name, n_poses, tuple(files), tuple(float(x) for x in phantom.isocentre_lps_mm), time.monotonic() - start
    )
