"""The simulated clinic: imager and delivery simulators talking the service's protocol, whole simulated fractions,
and the in-process room the console's demo mode drives.

A room of :mod:`spineguide.tracking` (docs/ARCHITECTURE.md): builds on the virtual room (:mod:`..room`) and the
service; never imports the console or the CLI.
"""
