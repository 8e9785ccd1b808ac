"""The virtual treatment room: synthetic phantoms, patient motion and a stereo kV simulator.

Everything is deterministic for a given seed. See ``docs/VIRTUAL_ROOM.md``.
"""

from .io import PHANTOMS, SimulationSummary, write_frame, write_simulation
from .kv import (
    BBFrames,
    DetectorModel,
    FrameTruth,
    KVSimulator,
    OutputDtype,
    SimulationError,
    StereoFrames,
    cylinder_chord_mm,
    render_bb_frames,
    sphere_chord_mm,
)
from .motion import Breathing, Drift, MotionError, MotionSum, StaticPose, SuddenShift, random_setup_pose
from ..errors import VirtualPhantomError
from .phantoms import HU, Phantom, Seed, SeedShape, cervical_phantom, thoracolumbar_phantom

from .perturb import perturbed_geometry, perturbed_imager

__all__ = [
    "perturbed_geometry",
    "perturbed_imager",
    "PHANTOMS",
    "SimulationSummary",
    "write_frame",
    "write_simulation",
    "BBFrames",
    "DetectorModel",
    "FrameTruth",
    "KVSimulator",
    "OutputDtype",
    "SimulationError",
    "StereoFrames",
    "cylinder_chord_mm",
    "render_bb_frames",
    "sphere_chord_mm",
    "Breathing",
    "Drift",
    "MotionError",
    "MotionSum",
    "StaticPose",
    "SuddenShift",
    "random_setup_pose",
    "HU",
    "Phantom",
    "VirtualPhantomError",
    "Seed",
    "SeedShape",
    "cervical_phantom",
    "thoracolumbar_phantom",
]
