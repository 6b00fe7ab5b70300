"""One client of either kind, sync or asyncio, behind one awaitable interface, so a test runs
the same steps against both."""

from __future__ import annotations

import asyncio
from typing import Any

from aiservices import AsyncToolClient, ToolClient


class Harness:
    """One client of either kind behind an awaitable call(method, ...)."""

    def __init__(self, kind: str, target: str, **kwargs: Any) -> None:
        self.kind = kind
        self.sync = ToolClient(target, **kwargs) if kind == "sync" else None
        self.aio = AsyncToolClient(target, **kwargs) if kind == "aio" else None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.sync is not None:
            return await asyncio.to_thread(getattr(self.sync, method), *args, **kwargs)
        assert self.aio is not None
        return await getattr(self.aio, method)(*args, **kwargs)

    async def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.aio is not None:
            await self.aio.close()
