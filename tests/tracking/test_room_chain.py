"""Realistic imaging chain and the floor-source room: analytic values for every switchable effect."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.io import geometry_from_json
from spineguide.registration.attenuation import linear_attenuation_per_mm
from spineguide.tracking.room.chain import (
    ChainConfig,
    DetectorMaps,
    MaterialPaths,
    Spectrum,
    material_mu_per_mm,
    render_chain_frame,
)
from spineguide.tracking.room.kv import OutputDtype, SimulationError
from spineguide.tracking.room.rooms import floor_source_geometry, room_geometry

PANEL = 64
RTOL_FLOAT = 1e-9  # float64 sums of the same terms in another order
SPR_RTOL = 1e-3  # a uniform input through a normalised Gaussian (float32 resize/blur)
FLAT_FIELD_RTOL = 1e-5  # float32 raw frame: (raw - offset) / gain returns the signal to float32 precision
PX_TOL = 1e-6  # projection of the isocentre, float64

# NIST XCOM mu/rho (cm2/g), water and aluminium at 20..150 keV, re-typed here to check the chain's table.
E_NIST = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
WATER_NIST = np.array([0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505])
AL_NIST = np.array([3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378]) * 2.699


def _ideal(**kw) -> ChainConfig:
    values = dict(blur_sigma_px=0.0, quantum_noise=False, dtype=OutputDtype.FLOAT32)
    values.update(kw)
    return ChainConfig(**values)


def _uniform(water_mm: float, bone_mm: float = 0.0) -> MaterialPaths:
    return MaterialPaths(np.full((PANEL, PANEL), water_mm), np.full((PANEL, PANEL), bone_mm))


def _frame(chain: ChainConfig, paths: MaterialPaths, seed: int = 0, previous=None):
    im = floor_source_geometry(PANEL)["A"]
    maps = DetectorMaps.make(PANEL, PANEL, chain)
    return render_chain_frame(paths, im, chain, maps, np.random.default_rng(seed), (), previous), maps


def _loglog(e, xs, ys):
    return np.exp(np.interp(np.log(e), np.log(xs), np.log(ys)))


def test_mono_spectrum_is_beer_lambert_with_the_simulators_attenuation():
    chain = _ideal(i0=10000.0, spectrum=Spectrum.mono(60.0))
    out, _ = _frame(chain, _uniform(150.0, 20.0))
    expected = 10000.0 * np.exp(-150.0 * linear_attenuation_per_mm("water", 60.0)
                                - 20.0 * linear_attenuation_per_mm("cortical_bone", 60.0))
    assert_allclose(out.primary, expected, rtol=RTOL_FLOAT)


def test_water_slab_transmission_is_the_spectrum_weighted_integral():
    kvp, al_mm, t_mm = 120.0, 2.5, 200.0
    chain = _ideal(i0=20000.0, spectrum=Spectrum.kramers(kvp, al_mm, bin_kev=2.5))
    out, _ = _frame(chain, _uniform(t_mm))
    # Kramers photons per keV (kVp - E)/E, aluminium filter, energy-integrating panel (weight E).
    edges = np.linspace(20.0, kvp, 41)
    e = 0.5 * (edges[1:] + edges[:-1])
    w = e * (kvp - e) / e * np.exp(-_loglog(e, E_NIST, AL_NIST) / 10.0 * al_mm)
    mu_w = _loglog(e, E_NIST, WATER_NIST) / 10.0
    expected = 20000.0 * (w * np.exp(-mu_w * t_mm)).sum() / w.sum()
    assert_allclose(out.primary, expected, rtol=RTOL_FLOAT)


def test_beam_hardening_lowers_the_effective_attenuation_with_thickness():
    s = Spectrum.kramers(120.0, 2.5)
    t = np.array([10.0, 100.0, 200.0, 400.0])
    mu_eff = -np.log(s.transmission({"water": t})) / t
    assert np.all(np.diff(mu_eff) < 0)
    mu = s.mu_per_mm("water")
    assert mu.min() < mu_eff.min() and mu_eff.max() < mu.max()


def test_gold_attenuation_jumps_at_its_k_edge():
    below, above = material_mu_per_mm("gold", [80.7, 80.75])
    assert above > 4.0 * below


@pytest.mark.parametrize("spr", [0.5, 1.5])
def test_scatter_to_primary_ratio_is_as_configured_behind_the_reference_thickness(spr):
    chain = _ideal(i0=10000.0, scatter_to_primary=spr, scatter_reference_thickness_mm=300.0)
    out, _ = _frame(chain, _uniform(300.0))
    assert_allclose(out.scatter / out.primary, spr, rtol=SPR_RTOL)
    double, _ = _frame(chain, _uniform(600.0))
    assert_allclose(double.scatter / double.primary, 2.0 * spr, rtol=SPR_RTOL)


def test_heel_gain_spans_the_columns():
    chain = _ideal(heel_gradient=0.2)
    out, _ = _frame(chain, _uniform(100.0))
    assert_allclose(out.primary[:, -1] / out.primary[:, 0], 1.1 / 0.9, rtol=RTOL_FLOAT)


def test_gain_and_offset_maps_are_applied_and_undone_exactly():
    chain = _ideal(i0=5000.0, gain_rms=0.08, offset_counts=300.0, offset_rms_counts=10.0, dead_rows=1, dead_cols=2)
    out, maps = _frame(chain, _uniform(100.0, 10.0))
    assert np.std(maps.gain) > 0.04 and np.std(maps.offset_counts) > 5.0
    assert maps.dead.sum() == PANEL + 2 * PANEL - 2
    raw = np.asarray(out.raw, dtype=np.float64)
    assert np.all(raw[maps.dead] == 0.0)
    live = ~maps.dead
    undone = (raw - maps.offset_counts) / maps.gain
    assert_allclose(undone[live], out.signal[live], rtol=FLAT_FIELD_RTOL)


def test_lag_adds_the_previous_signal():
    chain = _ideal(lag_fraction=0.05)
    previous = np.full((PANEL, PANEL), 1000.0)
    out, _ = _frame(chain, _uniform(100.0), previous=previous)
    assert_allclose(out.signal, out.primary + 50.0, rtol=RTOL_FLOAT)


def test_quantum_noise_is_poisson():
    chain = ChainConfig(i0=2000.0, blur_sigma_px=0.0, dtype=OutputDtype.FLOAT32)
    out, _ = _frame(chain, _uniform(50.0), seed=3)
    mean = float(out.primary.mean())
    n = out.raw.size
    # Sample mean within 5 standard errors, variance within 5 of its standard errors (~ sqrt(2/n)).
    assert abs(out.raw.mean() - mean) < 5.0 * np.sqrt(mean / n)
    assert abs(out.raw.var() / mean - 1.0) < 5.0 * np.sqrt(2.0 / n)


def test_chain_config_rejects_out_of_range_values():
    with pytest.raises(SimulationError, match="scatter_to_primary"):
        ChainConfig(scatter_to_primary=-0.1)
    with pytest.raises(SimulationError, match="dead_rows"):
        ChainConfig(dead_rows=-1)
    with pytest.raises(SimulationError, match="kvp"):
        Spectrum.kramers(200.0)
    with pytest.raises(SimulationError, match="unknown material"):
        material_mu_per_mm("lead", 60.0)


def test_floor_room_is_a_valid_kv_geometry_unlike_the_default():
    g = floor_source_geometry()
    again = geometry_from_json(g.to_json())
    for a, b in zip(g.imagers, again.imagers):
        assert_allclose(a.projection_matrix, b.projection_matrix, rtol=0, atol=1e-9)
    for im in g.imagers:
        assert im.source_mm[2] < 0  # floor sources
        assert_allclose(im.project(np.zeros((1, 3)))[0], [511.5, 511.5], rtol=0, atol=PX_TOL)
        assert_allclose(im.magnification, 2300.0 / 1500.0, rtol=1e-12)
    default = room_geometry("default")
    assert default["A"].source_mm[2] > 0
    with pytest.raises(SimulationError, match="unknown room"):
        room_geometry("attic")
