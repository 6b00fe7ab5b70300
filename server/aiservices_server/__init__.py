"""aiservices server: a grpc.aio ToolService, and the same tools over MCP, in front of AI-powered
tools."""

from importlib.metadata import version

__version__ = version("aiservices-server")
