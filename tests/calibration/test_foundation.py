"""The shared foundation (spineguide.calibration.foundation) and the one RQ decomposition of a projection matrix."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.foundation import (
    checked_integer,
    checked_number,
    enum_member,
    enum_values,
    json_default,
    readonly_array,
    to_json_value,
)
from spineguide.calibration.geometry import rq_positive_diagonal

#: float64 round-off of a 3x3 product of O(1000) entries.
MATRIX_TOL = 1e-9


class _Bad(ValueError):
    pass


class _Colour(Enum):
    RED = "red"
    GREEN = "green"


def test_readonly_array_is_a_read_only_copy():
    source = np.array([1, 2, 3])
    out = readonly_array(source)
    assert out.dtype == np.float64 and not out.flags.writeable
    source[0] = 99
    assert out[0] == 1.0 and source.flags.writeable
    with pytest.raises(ValueError):
        out[1] = 0.0
    assert readonly_array([1, 2], dtype=np.int32).dtype == np.int32


@pytest.mark.parametrize("value", [True, "1.5", None, [1.0], np.array([1.0]), math.nan, math.inf, -math.inf])
def test_checked_number_refuses_what_is_not_a_finite_real(value):
    with pytest.raises(_Bad, match="^speed must be a number$"):
        checked_number(value, _Bad, "speed must be a number")


def test_checked_number_bounds():
    assert checked_number(0, _Bad, "m", minimum=0.0) == 0.0
    assert isinstance(checked_number(np.float32(2.5), _Bad, "m"), float)
    with pytest.raises(_Bad):
        checked_number(0, _Bad, "m", minimum=0.0, exclusive_minimum=True)
    assert checked_number(1e-300, _Bad, "m", minimum=0.0, exclusive_minimum=True) == 1e-300
    assert checked_number(5, _Bad, "m", minimum=1, maximum=5) == 5.0
    with pytest.raises(_Bad):
        checked_number(5.000001, _Bad, "m", minimum=1, maximum=5)
    with pytest.raises(_Bad):
        checked_number(0.999999, _Bad, "m", minimum=1, maximum=5)


@pytest.mark.parametrize("value", [True, 1.0, "2", None, np.array([2]), -1])
def test_checked_integer_refuses_what_is_not_an_integer_at_least_the_minimum(value):
    with pytest.raises(_Bad, match="^count must be an integer >= 0$"):
        checked_integer(value, _Bad, "count must be an integer >= 0", minimum=0)


def test_checked_integer_accepts_python_and_numpy_integers():
    assert checked_integer(np.int64(3), _Bad, "m", minimum=1) == 3
    assert type(checked_integer(np.uint8(7), _Bad, "m")) is int
    with pytest.raises(_Bad):
        checked_integer(0, _Bad, "m", minimum=1)


def test_enum_member():
    assert enum_member(_Colour, "green", _Bad, "x") is _Colour.GREEN
    assert enum_member(_Colour, _Colour.RED, _Bad, "x") is _Colour.RED
    with pytest.raises(_Bad, match=r"^colour 'blue' unknown \(red, green\)$"):
        enum_member(_Colour, "blue", _Bad, f"colour 'blue' unknown ({', '.join(enum_values(_Colour))})")
    assert enum_values(_Colour) == ["red", "green"]


def test_to_json_value_is_strict_json():
    obj = {1: np.float32(1.5), "a": [np.int64(3), math.nan, (np.inf, -1.0)], "p": Path("/x/y"), "c": _Colour.RED,
           "arr": np.array([[1.0, np.nan]]), "b": np.bool_(True), "n": None, "s": "text"}
    out = to_json_value(obj)
    assert out == {"1": 1.5, "a": [3, None, [None, -1.0]], "p": "/x/y", "c": "red", "arr": [[1.0, None]], "b": True,
                   "n": None, "s": "text"}
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert type(out["a"][0]) is int and type(out["b"]) is bool


def test_json_default():
    text = json.dumps({"a": np.arange(3), "b": np.float32(0.5), "p": Path("q")}, default=json_default)
    assert json.loads(text) == {"a": [0, 1, 2], "b": 0.5, "p": "q"}
    with pytest.raises(TypeError, match="not JSON-able: object"):
        json.dumps(object(), default=json_default)


def _rotation(pitch_deg: float, roll_deg: float, yaw_deg: float) -> np.ndarray:
    from spineguide.registration.pose import rotation_matrix

    return rotation_matrix([pitch_deg, roll_deg, yaw_deg])


@pytest.mark.parametrize("seed", range(5))
def test_rq_recovers_known_intrinsics_and_rotation(seed):
    rng = np.random.default_rng(seed)
    k_true = np.array([[rng.uniform(800, 2000), rng.uniform(-5, 5), rng.uniform(100, 900)],
                       [0.0, rng.uniform(800, 2000), rng.uniform(100, 900)],
                       [0.0, 0.0, 1.0]])
    r_true = _rotation(*rng.uniform(-180, 180, 3))
    scale = rng.uniform(0.1, 10) * rng.choice([-1.0, 1.0])  # a projection matrix is known up to scale and sign
    k, r = rq_positive_diagonal(scale * k_true @ r_true)
    assert np.all(np.diag(k) >= 0)
    assert_allclose(np.tril(k, -1), 0.0, atol=MATRIX_TOL * abs(scale))
    assert_allclose(r @ r.T, np.eye(3), atol=MATRIX_TOL)
    assert_allclose(k @ r, scale * k_true @ r_true, rtol=0, atol=MATRIX_TOL * 1e3 * abs(scale))
    # up to the sign of the whole matrix, the factors are the true ones
    sign = np.sign(scale)
    assert_allclose(k / k[2, 2], k_true, rtol=0, atol=1e-6)
    assert_allclose(r, sign * r_true, rtol=0, atol=1e-9)
