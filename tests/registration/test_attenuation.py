"""HU -> linear attenuation: the bilinear model's defining properties and the table's refusals."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.attenuation import (
    DEFAULT_CT_ENERGY_KEV,
    DEFAULT_IMAGING_ENERGY_KEV,
    bone_hu,
    hu_to_mu_per_mm,
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
