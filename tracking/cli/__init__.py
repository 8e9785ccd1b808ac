"""The ``spineguide`` command line (entry point :func:`spineguide.tracking.cli.main.main`).

The top room of :mod:`spineguide.tracking`: the only code that prints; nothing else imports it. Kept free of
imports here so that ``spineguide --help`` loads no numeric library.
"""
