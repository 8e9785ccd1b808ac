"""Hounsfield units to linear attenuation at an effective kV energy.

Model (bilinear, water/air below 0 HU and water/bone above; after Burger et
al. Med. Phys. 29 (2002) and the usual DRR practice):

- the CT measured ``mu_ct = mu_water(E_ct) (1 + HU / 1000)`` at its own
  effective energy ``E_ct`` (70 keV for a 120 kVp CT by default);
- ``HU <= 0`` is a mixture of air and water, which scales with energy like
  water: ``mu(E) = mu_water(E) (1 + HU / 1000)``;
- ``HU > 0`` is a mixture of water and cortical bone:
  ``mu(E) = mu_water(E) + HU / HU_bone * (mu_bone(E) - mu_water(E))`` with
  ``HU_bone = 1000 (mu_bone(E_ct) / mu_water(E_ct) - 1)``.

Mass attenuation coefficients (with coherent scattering) are transcribed
from NIST XCOM / Hubbell & Seltzer, NISTIR 5632 (1995): water (liquid),
cortical bone (ICRU-44, 1.92 g/cm3), gold, tungsten and iron; interpolated
log-log in energy between the tabulated points. Gold's K edge (80.7 keV) and
tungsten's (69.5 keV) fall between table points, so energies in (60, 100)
keV are refused for those metals rather than interpolated across an edge.
"""

from __future__ import annotations

import numpy as np

from .errors import RegistrationError

__all__ = [
    "MATERIALS",
    "mass_attenuation_cm2_per_g",
    "linear_attenuation_per_mm",
    "hu_to_mu_per_mm",
    "int16_hu_mu_table",
    "MU_TABLE_OFFSET",
    "bone_hu",
    "DEFAULT_IMAGING_ENERGY_KEV",
    "DEFAULT_CT_ENERGY_KEV",
]

#: Effective energy of a ~110-120 kVp kV imaging beam, keV.
DEFAULT_IMAGING_ENERGY_KEV = 60.0
#: Effective energy of a 120 kVp diagnostic CT, keV.
DEFAULT_CT_ENERGY_KEV = 70.0
#: Entry of :func:`int16_hu_mu_table` that holds the attenuation of 0 HU (the table starts at -32768 HU).
MU_TABLE_OFFSET = 32768
#: Voxels converted per step by :func:`hu_to_mu_per_mm`: the temporaries of a step stay in cache, never
#: volume-sized (1 Mi voxels, 4 MiB per float32 temporary).
_CONVERT_CHUNK_VOXELS = 1 << 20

_ENERGIES_KEV = np.array([40.0, 50.0, 60.0, 80.0, 100.0, 150.0])

# name: (density g/cm3, mu/rho cm2/g at _ENERGIES_KEV, (lo, hi) keV band refused: absorption edge)
MATERIALS: dict[str, tuple[float, np.ndarray, tuple[float, float] | None]] = {
    "water": (1.0, np.array([0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505]), None),
    "cortical_bone": (1.92, np.array([0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480]), None),
    "gold": (19.32, np.array([13.10, 7.256, 4.528, 2.185, 5.158, 1.859]), (60.0, 100.0)),
    "tungsten": (19.3, np.array([10.67, 5.949, 3.713, 7.810, 4.438, 1.581]), (60.0, 80.0)),
    "iron": (7.874, np.array([3.629, 1.958, 1.205, 0.5952, 0.3717, 0.1964]), None),
}


def mass_attenuation_cm2_per_g(material: str, energy_kev: float) -> float:
    """Mass attenuation coefficient mu/rho (cm2/g) of a tabulated material at ``energy_kev``."""
    if material not in MATERIALS:
        raise RegistrationError(f"unknown material {material!r} (known: {', '.join(MATERIALS)})")
    _, table, edge = MATERIALS[material]
    e = float(energy_kev)
    if not (_ENERGIES_KEV[0] <= e <= _ENERGIES_KEV[-1]):
        raise RegistrationError(
            f"energy {e} keV outside the tabulated range {_ENERGIES_KEV[0]:g}-{_ENERGIES_KEV[-1]:g} keV"
        )
    if edge is not None and edge[0] < e < edge[1]:
        raise RegistrationError(
            f"{material}: {e} keV lies between table points across the K absorption edge "
            f"({edge[0]:g}-{edge[1]:g} keV); choose an energy outside that band"
        )
    return float(np.exp(np.interp(np.log(e), np.log(_ENERGIES_KEV), np.log(table))))


def linear_attenuation_per_mm(material: str, energy_kev: float) -> float:
    """Linear attenuation coefficient (1/mm) of a material at its tabulated density."""
    density = MATERIALS[material][0] if material in MATERIALS else None
    mu_cm = mass_attenuation_cm2_per_g(material, energy_kev) * density
    return mu_cm / 10.0


def bone_hu(ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV) -> float:
    """HU of cortical bone on a CT of effective energy ``ct_energy_kev``."""
    return 1000.0 * (
        linear_attenuation_per_mm("cortical_bone", ct_energy_kev) / linear_attenuation_per_mm("water", ct_energy_kev)
        - 1.0
    )


def hu_to_mu_per_mm(
    hu: np.ndarray,
    energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
    ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV,
) -> np.ndarray:
    """Linear attenuation (1/mm, float32) of CT voxels at an effective imaging energy.

    Parameters
    ----------
    hu : array
        Hounsfield units (any shape).
    energy_kev : float
        Effective energy of the kV imaging beam, keV.
    ct_energy_kev : float
        Effective energy at which the CT was measured, keV.

    Returns
    -------
    array of float32, same shape
        ``mu`` in 1/mm; never negative (HU below -1000 count as air).
    """
    hu = np.asarray(hu)
    out = np.empty(hu.shape, dtype=np.float32)
    mu_w = np.float32(linear_attenuation_per_mm("water", energy_kev))
    mu_b = np.float32(linear_attenuation_per_mm("cortical_bone", energy_kev))
    slope_hi = np.float32((mu_b - mu_w) / bone_hu(ct_energy_kev))
    src = hu.reshape(-1)  # a view of a contiguous array; a copy of a strided one
    dst = out.reshape(-1)
    # Step by step through the volume: each element gets the same float32 operations as a
    # whole-array expression would (bit for bit), with no volume-sized temporaries.
    for start in range(0, src.size, _CONVERT_CHUNK_VOXELS):
        h = src[start : start + _CONVERT_CHUNK_VOXELS].astype(np.float32, copy=False)
        mu = np.where(h <= 0, mu_w * (1.0 + h / np.float32(1000.0)), mu_w + h * slope_hi)
        np.maximum(mu, np.float32(0.0), out=dst[start : start + _CONVERT_CHUNK_VOXELS])
    return out


def int16_hu_mu_table(
    energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
    ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV,
) -> np.ndarray:
    """Linear attenuation (1/mm, float32) of every whole HU value an int16 CT can store.

    Entry ``h + MU_TABLE_OFFSET`` is ``hu_to_mu_per_mm(h)`` for ``h`` in
    -32768 ... 32767, bit for bit: a CT kept as int16 HU (half the memory of
    float32 attenuation) projects through this table to the same line integrals.
    Returns a read-only ``(65536,)`` array.
    """
    table = hu_to_mu_per_mm(np.arange(-MU_TABLE_OFFSET, MU_TABLE_OFFSET, dtype=np.float32), energy_kev, ct_energy_kev)
    table.setflags(write=False)
    return table
