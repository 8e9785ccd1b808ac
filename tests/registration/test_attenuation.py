"""HU -> linear attenuation: the bilinear model's defining properties and the table's refusals."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.attenuation import (
    DEFAULT_CT_ENERGY_KEV,
    DEFAULT_IMAGING_ENERGY_KEV,
    MU_TABLE_OFFSET,
    _CONVERT_CHUNK_VOXELS,
    bone_hu,
    hu_to_mu_per_mm,
    int16_hu_mu_table,
    linear_attenuation_per_mm,
    mass_attenuation_cm2_per_g,
)
from spineguide.registration.errors import RegistrationError

# hu_to_mu_per_mm returns float32: 1e-7 relative of ~0.05/mm.
MU_TOL_PER_MM = 1e-7


def test_water_table_value_at_60_kev():
    # NIST XCOM water, 60 keV: mu/rho = 0.2059 cm2/g -> 0.02059 /mm at 1 g/cm3.
    assert_allclose(linear_attenuation_per_mm("water", 60.0), 0.02059, rtol=0, atol=1e-12)


@pytest.mark.parametrize("energy_kev", [40.0, 60.0, 100.0])
def test_model_fixed_points(energy_kev):
    mu_w = linear_attenuation_per_mm("water", energy_kev)
    mu_b = linear_attenuation_per_mm("cortical_bone", energy_kev)
    hu = np.array([-1000.0, -2000.0, 0.0, bone_hu(DEFAULT_CT_ENERGY_KEV)])
    mu = hu_to_mu_per_mm(hu, energy_kev)
    assert mu.dtype == np.float32
    assert_allclose(mu, [0.0, 0.0, mu_w, mu_b], rtol=0, atol=MU_TOL_PER_MM)


def test_continuous_and_increasing_through_zero_hu():
    eps = 1e-3
    mu = hu_to_mu_per_mm(np.array([-eps, 0.0, eps]), DEFAULT_IMAGING_ENERGY_KEV).astype(np.float64)
    # Each branch's slope is below 1e-4 /mm per HU, so +-1e-3 HU moves mu by < 1e-7 /mm.
    assert_allclose(mu, mu[1], rtol=0, atol=MU_TOL_PER_MM)
    assert np.all(np.diff(hu_to_mu_per_mm(np.linspace(-1000, 3000, 401))) > 0)


def test_bone_hu_at_ct_energy_is_the_bone_water_ratio():
    ratio = linear_attenuation_per_mm("cortical_bone", 70.0) / linear_attenuation_per_mm("water", 70.0)
    assert_allclose(bone_hu(70.0), 1000.0 * (ratio - 1.0), rtol=0, atol=1e-9)


def test_log_log_interpolation_between_table_points():
    # Log-log linear: at the log-midpoint of the 50 and 60 keV nodes, the geometric mean of their values.
    e = float(np.sqrt(50.0 * 60.0))
    expected = np.sqrt(0.2269 * 0.2059)
    assert_allclose(mass_attenuation_cm2_per_g("water", e), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("material", "energy_kev"), [("gold", 70.0), ("gold", 85.0), ("tungsten", 65.0)])
def test_refuses_to_interpolate_across_a_k_edge(material, energy_kev):
    with pytest.raises(RegistrationError, match=rf"{material}: {energy_kev} keV lies between table points across"):
        linear_attenuation_per_mm(material, energy_kev)


def test_metals_away_from_their_edges():
    # Gold 19.32 g/cm3 x 4.528 cm2/g at 60 keV = 87.48 /cm.
    assert_allclose(linear_attenuation_per_mm("gold", 60.0), 19.32 * 4.528 / 10.0, rtol=1e-12, atol=0)
    assert linear_attenuation_per_mm("tungsten", 100.0) > linear_attenuation_per_mm("iron", 100.0)


def test_unknown_material_and_energy_out_of_table():
    with pytest.raises(RegistrationError, match=r"unknown material 'lead' \(known: water, cortical_bone"):
        linear_attenuation_per_mm("lead", 60.0)
    with pytest.raises(RegistrationError, match=r"energy 30\.0 keV outside the tabulated range 40-150 keV"):
        hu_to_mu_per_mm(np.zeros(3), energy_kev=30.0)


# ------------------------------------------------------- conversion in steps, and the int16 table
def _model_mu_per_mm(hu, energy_kev=DEFAULT_IMAGING_ENERGY_KEV, ct_energy_kev=DEFAULT_CT_ENERGY_KEV):
    """The bilinear model in float64 from its definition (module docstring), for comparison."""
    hu = np.asarray(hu, dtype=np.float64)
    mu_w = linear_attenuation_per_mm("water", energy_kev)
    mu_b = linear_attenuation_per_mm("cortical_bone", energy_kev)
    mu = np.where(hu <= 0, mu_w * (1 + hu / 1000), mu_w + hu / bone_hu(ct_energy_kev) * (mu_b - mu_w))
    return np.maximum(mu, 0.0)


def test_conversion_in_steps_is_the_same_as_value_by_value():
    # A volume of 2.5 conversion steps, read through a strided view: every voxel gets what a
    # one-value conversion gives it (bit for bit), whichever step it falls in.
    rng = np.random.default_rng(7)
    n = int(2.5 * _CONVERT_CHUNK_VOXELS)
    base = rng.uniform(-1200.0, 3000.0, size=(2, n // 40, 40)).astype(np.float32)
    hu = base[0, :, ::2]  # not contiguous
    mu = hu_to_mu_per_mm(hu)
    assert mu.shape == hu.shape and mu.dtype == np.float32 and mu.flags.c_contiguous
    flat = hu.ravel()
    picks = np.r_[0, _CONVERT_CHUNK_VOXELS // 20 - 1, _CONVERT_CHUNK_VOXELS // 20, rng.integers(0, flat.size, 500)]
    for idx in picks:
        assert mu.ravel()[idx] == hu_to_mu_per_mm(flat[idx : idx + 1])[0]
    assert_allclose(mu, _model_mu_per_mm(hu), rtol=0, atol=MU_TOL_PER_MM)
    water = hu_to_mu_per_mm(np.float32(0.0))  # a scalar stays a scalar-shaped array, with its value
    assert water.shape == () and water == np.float32(linear_attenuation_per_mm("water", DEFAULT_IMAGING_ENERGY_KEV))


@pytest.mark.parametrize("energy_kev", [40.0, 60.0, 100.0])
def test_int16_table_holds_the_conversion_of_every_whole_hu(energy_kev):
    table = int16_hu_mu_table(energy_kev)
    assert table.shape == (65536,) and table.dtype == np.float32 and not table.flags.writeable
    every = np.arange(-32768, 32768).astype(np.int16)
    # Bit for bit what converting the values directly gives (so DRRs through the table are too) ...
    assert np.array_equal(table[every.astype(np.int64) + MU_TABLE_OFFSET], hu_to_mu_per_mm(every, energy_kev))
    # ... and the model's values at its fixed points: air, water, cortical bone, and nothing below air.
    assert table[MU_TABLE_OFFSET - 1000] == 0.0 and not table[: MU_TABLE_OFFSET - 1000].any()
    assert table[MU_TABLE_OFFSET] == np.float32(linear_attenuation_per_mm("water", energy_kev))
    bone = int(round(bone_hu()))
    assert_allclose(table[MU_TABLE_OFFSET + bone], linear_attenuation_per_mm("cortical_bone", energy_kev),
                    rtol=1e-3)  # bone_hu is not a whole number: within a HU of the bone value
    # float32 arithmetic: three roundings of 2**-23 relative each, or MU_TOL_PER_MM near air.
    assert_allclose(table, _model_mu_per_mm(every, energy_kev), rtol=3 * 2.0**-23, atol=MU_TOL_PER_MM)
