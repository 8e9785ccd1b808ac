"""The real-time service: ingest, pairing, processing, the deterministic engine, gating, the wire protocol and the record.

Rooms of :mod:`spineguide.tracking` (docs/ARCHITECTURE.md): the service imports the shared value types
(:mod:`~spineguide.tracking.frames`, :mod:`~spineguide.tracking.errors`) and fiducial localisation, never the
simulators, the console or the CLI (``tests/test_layering.py``). Clients (simulators, console) use its protocol:
:mod:`.wire`, :mod:`.security` (CURVE keys), :mod:`.record`, :mod:`.config`, :mod:`.config_file` and :mod:`.plan`.
"""
