"""Shared by the console tests: a connected console behind aiohttp's test client."""

from __future__ import annotations

import asyncio

from aiohttp import test_utils

from spineguide.tracking.console.config import ConsoleConfig
from spineguide.tracking.console.server import ConsoleServer


def run_console(coro_fn, config: ConsoleConfig, *, offer_plans: bool = False):
    """Run ``coro_fn(console, client)`` with a connected console behind aiohttp's test client.

    ``offer_plans``: the console offers ``config.plans`` as if the (absent) service had listed them
    (``list_plans``).
    """
    async def main():
        console = ConsoleServer(config)
        if offer_plans:
            console.plans = config.plans
        await console.connect()
        client = test_utils.TestClient(test_utils.TestServer(console.app))
        await client.start_server()
        try:
            return await coro_fn(console, client)
        finally:
            await client.close()
            await console.stop()
    return asyncio.run(main())
