"""Fiducial localisation: flat-field correction, seed detection, the faint-seed search, stereo matching and triangulation.

A room of :mod:`spineguide.tracking` (docs/ARCHITECTURE.md): imports only the shared value types
(:mod:`~spineguide.tracking.errors`) and the lower packages, never the service, the simulators, the console or the CLI.
"""
