"""A real fineserve server in a background thread, on free ports, for tests; and the status a
call to it ends with."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fineserve.server.app import Server
from fineserve.server.config import Settings, load_settings

T = TypeVar("T")


class RunningServer:
    """Starts ``server.app.Server`` on its own event loop in a thread; ``stop`` shuts it down."""

    def __init__(self, repository: Path, **settings: Any) -> None:
        defaults: dict[str, Any] = {"grpc_host": "localhost", "grpc_port": 0, "metrics_port": 0}
        self.settings: Settings = load_settings(model_repository=repository, **(defaults | settings))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: Server = self.call(self._make())
        self.call(self.server.start())

    async def _make(self) -> Server:
        return Server(self.settings)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"localhost:{self.server.grpc_port}"

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def code_of(call: Any) -> grpc.StatusCode:
    """The status ``call()`` ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
