"""fiducials/1 files: round trip, LPS -> room mapping against the worked numbers, error paths."""

from __future__ import annotations

import json

import pytest
from numpy.testing import assert_allclose

from spineguide.registration.io import (
    FIDUCIALS_SCHEMA,
    FiducialFileError,
    FiducialSchemaError,
    FiducialSet,
    fiducials_from_json,
    read_fiducials,
    write_fiducials,
)

EXACT_MM = 1e-9  # JSON keeps float64 exactly (repr round trip); mapping is a signed permutation


def _doc(entries):
    return {"schema": FIDUCIALS_SCHEMA, "fiducials": entries}


def test_round_trip(tmp_path):
    fs = FiducialSet(("F1", "F2"), [[1.25, -40.0, -250.5], [0.1, 0.2, 0.3]])
    back = read_fiducials(write_fiducials(fs, tmp_path / "sub" / "fid.json"))
    assert back.names == ("F1", "F2")
    assert_allclose(back.positions_lps_mm, fs.positions_lps_mm, rtol=0, atol=0)
    assert json.loads((tmp_path / "sub" / "fid.json").read_text())["schema"] == "fiducials/1"


def test_unknown_fields_and_minor_version_are_accepted():
    doc = {"schema": "fiducials/1.2", "comment": "x",
           "fiducials": [{"name": "F1", "position_mm": [1, 2, 3], "material": "gold"}]}
    assert fiducials_from_json(doc).names == ("F1",)


def test_to_room_matches_conventions_vectors(conventions_vectors):
    for case in conventions_vectors["lps_to_room"]:
        pts = [p["lps_mm"] for p in case["points"]]
        fs = FiducialSet(tuple(f"P{i}" for i in range(len(pts))), pts)
        room = fs.to_room(case["isocentre_lps_mm"], case["patient_position"])
        assert_allclose(room, [p["room_mm"] for p in case["points"]], rtol=0, atol=EXACT_MM)


def test_hfs_lps_posterior_is_room_down():
    # HFS: +y (posterior) in LPS is towards the floor, room -Z.
    fs = FiducialSet(("F1",), [[0.0, 10.0, 0.0]])
    assert_allclose(fs.to_room([0, 0, 0], "HFS"), [[0.0, 0.0, -10.0]], rtol=0, atol=EXACT_MM)


# ------------------------------------------------------------------ error paths
@pytest.mark.parametrize("schema", ["fiducials/2", "bb-phantom/1", "fiducials", 3])
def test_unknown_schema_is_refused(schema):
    with pytest.raises(FiducialSchemaError, match="unknown schema"):
        fiducials_from_json({"schema": schema, "fiducials": [{"name": "F1", "position_mm": [0, 0, 0]}]})


def test_missing_schema_is_refused():
    with pytest.raises(FiducialSchemaError, match="no 'schema' field"):
        fiducials_from_json({"fiducials": []})


def test_duplicate_names_are_refused():
    with pytest.raises(FiducialFileError, match=r"duplicate fiducial names \['F1'\]"):
        fiducials_from_json(_doc([{"name": "F1", "position_mm": [0, 0, 0]}, {"name": "F1", "position_mm": [1, 0, 0]}]))


def test_no_fiducials_is_refused():
    with pytest.raises(FiducialFileError, match="at least 1 fiducial"):
        fiducials_from_json(_doc([]))


def test_non_finite_position_is_refused():
    with pytest.raises(FiducialFileError, match="fiducial 'F2' position is not finite"):
        fiducials_from_json(_doc([{"name": "F1", "position_mm": [0, 0, 0]},
                                  {"name": "F2", "position_mm": [0, float("nan"), 0]}]))


@pytest.mark.parametrize("pos", [[1, 2], "1,2,3", [1, 2, "x"], [1, True, 2]])
def test_bad_position_is_refused(pos):
    with pytest.raises(FiducialFileError, match="fiducial 'F1' position_mm must be 3 numbers"):
        fiducials_from_json(_doc([{"name": "F1", "position_mm": pos}]))


def test_missing_name_is_refused():
    with pytest.raises(FiducialFileError, match="fiducial #0 has no name"):
        fiducials_from_json(_doc([{"position_mm": [0, 0, 0]}]))


def test_fiducials_not_a_list_is_refused():
    with pytest.raises(FiducialFileError, match="'fiducials' must be a list"):
        fiducials_from_json({"schema": FIDUCIALS_SCHEMA, "fiducials": {"F1": [0, 0, 0]}})


def test_invalid_json_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(FiducialFileError, match="bad.json: not valid JSON"):
        read_fiducials(p)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FiducialFileError, match="nothere.json: cannot read"):
        read_fiducials(tmp_path / "nothere.json")


def test_decubitus_position_is_refused_for_room_mapping():
    from spineguide.registration.errors import PatientPositionError

    with pytest.raises(PatientPositionError, match="HFDL"):
        FiducialSet(("F1",), [[0, 0, 0]]).to_room([0, 0, 0], "HFDL")
