"""The live console: a web page served next to the service (``spineguide console``).

- :mod:`.live` turns the service's ``correction/1``, ``gating/1`` and
  ``heartbeat/1`` messages into the page's state (no sockets, no clocks of its own).
- :mod:`.display` renders kV frames for display (downsampled, contrast
  windowed, PNG) with the fiducial overlays.
- :mod:`.review` analyses a recorded session and writes the HTML review report.
- :mod:`.server` is the aiohttp application: the page, its WebSocket feed,
  the operator login and the authenticated commands, session review and QA.
"""

from .config import ConsoleConfig, ConsoleConfigError, console_config_from_service
from .display import DisplayFrame, SeedOverlay, render_frame
from .live import LiveState
from .review import SessionReview, list_sessions, review_session, write_review_html
from .server import ConsoleServer, build_app

__all__ = [
    "ConsoleConfig",
    "ConsoleConfigError",
    "ConsoleServer",
    "DisplayFrame",
    "LiveState",
    "SeedOverlay",
    "SessionReview",
    "build_app",
    "console_config_from_service",
    "list_sessions",
    "render_frame",
    "review_session",
    "write_review_html",
]
