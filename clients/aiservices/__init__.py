"""Python client for aiservices.v1.ToolService; the generated stubs live in aiservices.v1."""

from aiservices.client import (
    AsyncToolClient,
    ContentItem,
    Status,
    TextContent,
    ToolAnnotations,
    ToolClient,
    ToolErrorInfo,
    ToolInfo,
    ToolPage,
    ToolResult,
    ToolServiceError,
    UnknownContent,
    dict_to_struct,
    struct_to_dict,
)

__all__ = [
    "AsyncToolClient",
    "ContentItem",
    "Status",
    "TextContent",
    "ToolAnnotations",
    "ToolClient",
    "ToolErrorInfo",
    "ToolInfo",
    "ToolPage",
    "ToolResult",
    "ToolServiceError",
    "UnknownContent",
    "dict_to_struct",
    "struct_to_dict",
]
