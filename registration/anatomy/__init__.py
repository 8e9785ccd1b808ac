"""Stereo 6-DoF 2D/3D registration of vertebral and skull anatomy to the planning CT.

A pair of raw kV frames is matched to DRRs of a region of interest (ROI) of the
planning CT, jointly over both views, to find the patient pose
``p_actual = R p_planned + t`` (room frame, mm, rotations about the
isocentre; docs/CONVENTIONS.md) and its couch correction ``C = P^-1``.

Method (``docs/ANATOMY_REGISTRATION.md``):

1. ROI volume: attenuation at the imaging energy in excess of water,
   ``max(mu - mu_water, 0)``, kept only inside the (slightly dilated) ROI mask
   and cropped to it (:meth:`AttenuationVolume.masked`). The excess over
   water is what makes a bone edge visible in a radiograph, and a box ROI then
   has no artificial box outline in its DRR. A background volume (everything
   else) is carried as a DRR linear in the pose.
2. Global stage (skipped in tracking mode): per view, a DRR of the ROI's
   neighbourhood (a 120 mm cube of anatomy around it, tapered at its faces) at
   the start pose is matched over a window of the radiograph by gradient
   correlation as a function of 2D shift (``cv2.matchTemplate`` on Sobel
   derivatives); the two shifts are triangulated into a 3D translation. A
   single vertebra matches its neighbours almost as well as itself; its
   neighbourhood does not.
3. Refinement, coarse to fine: a first level on the neighbourhood (long lever
   arm for the rotations), then the ROI; Levenberg-Marquardt on the
   least-squares form of the similarity (normalised gradient images for
   gradient correlation, normalised intensities for NCC), central-difference
   pose derivatives from batched DRRs (all 12 displaced poses of a view in one
   kernel call, the two views on two threads), rotations about the ROI centre.
4. Quality: per-view similarity, each view's residual 2D shift at the joint
   optimum, curvature (Gauss-Newton covariance), ROI on the panel, saturated
   pixels, bounds, convergence, and a wrong-level check at the result (the
   neighbourhood's match there against one vertebral level up or down the
   spine, at twice the global stage's resolution); ``quality.ok`` is False
   with a reason code when the match cannot be trusted.

The package, one module a job: :mod:`.roi` (the region of interest), :mod:`.config` (settings and pyramid levels),
:mod:`.result` (result, quality, reason codes), :mod:`.images` (binning, smoothing, features), :mod:`.levels`
(the resolution pyramid), :mod:`.background` (the CT outside the ROI), :mod:`.global_search` (step 2 and the
wrong-level check), :mod:`.refine` (step 3) with :mod:`.optimiser` (its Levenberg-Marquardt loop), :mod:`.quality`
(step 4), :mod:`.one_view` (one view under a motion prior, issue 18), and :mod:`.registration`
(:class:`AnatomyRegistration`, :func:`register_anatomy`).
"""

from __future__ import annotations

from ..errors import AnatomyConfigError, RoiError
from .config import AnatomyConfig, PyramidLevel
from .registration import AnatomyRegistration, register_anatomy
from .result import AnatomyQuality, AnatomyResult, OneViewAnatomyResult, QualityReason
from .roi import RegionOfInterest

__all__ = [
    "AnatomyConfig",
    "AnatomyQuality",
    "AnatomyRegistration",
    "AnatomyResult",
    "OneViewAnatomyResult",
    "PyramidLevel",
    "QualityReason",
    "RegionOfInterest",
    "RoiError",
    "AnatomyConfigError",
    "register_anatomy",
]
