"""aiservices server: a grpc.aio ToolService, and the same tools over MCP, in front of AI-powered
tools."""

from typing import Any


def __getattr__(name: str) -> Any:
    """`__version__`, read from the installed metadata when first asked for: importing the
    package stays instant, so the entry point's first line runs within milliseconds."""
    if name == "__version__":
        from importlib.metadata import version  # noqa: PLC0415

        globals()["__version__"] = found = version("aiservices-server")  # read once
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
