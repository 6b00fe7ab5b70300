"""Python client for aiservices.v1.ToolService; the generated stubs live in aiservices.v1."""

from importlib.metadata import PackageNotFoundError, version

from aiservices._convert import as_json
from aiservices.client import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_TIMEOUT,
    READ_RETRY,
    AsyncToolClient,
    CallOptions,
    ClientOptions,
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
from aiservices.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FeatureDisabled,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    ToolError,
    Unauthenticated,
    Unavailable,
)
from aiservices.refine import REFINE_PROMPT, PromptMessage, RefinedPrompt
from aiservices.retry import NO_RETRY, RetryPolicy, service_config
from aiservices.settings import SettingsError

DISTRIBUTION = "aiservices-client"
try:
    # The installed distribution's version: one number for the package, the command and pip.
    __version__: str = version(DISTRIBUTION)
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "READ_RETRY",
    "REFINE_PROMPT",
    "AsyncToolClient",
    "CallOptions",
    "ClientOptions",
    "ContentItem",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FeatureDisabled",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PromptMessage",
    "RateLimited",
    "RefinedPrompt",
    "ResourceExhausted",
    "RetryPolicy",
    "SettingsError",
    "Status",
    "TextContent",
    "ToolAnnotations",
    "ToolClient",
    "ToolError",
    "ToolErrorInfo",
    "ToolInfo",
    "ToolPage",
    "ToolResult",
    "ToolServiceError",
    "Unauthenticated",
    "Unavailable",
    "UnknownContent",
    "__version__",
    "as_json",
    "dict_to_struct",
    "service_config",
    "struct_to_dict",
]
