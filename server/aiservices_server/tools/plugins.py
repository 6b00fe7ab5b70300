"""Tools as packages: the entry points of group `aiservices.tools`, loaded once at start-up.

An installed distribution declares an entry point in that group; it names a factory, a callable
taking one `ToolContext` and returning an iterable of tools (objects implementing
`aiservices_server.tools.base.Tool`). Which are loaded is `AGENTA_AI_SERVICES_PLUGINS` (a list of
entry point names; unset: every one installed). Every tool a factory returns is checked here,
before anything is served: a plugin that fails to import, raises, or returns something that is
not a valid tool stops start-up with one `PluginError` line naming the plugin (entry point and
distribution) and what went wrong, never a traceback. Its tools then go through the core like
any other: permission, rate limit, bounds, schema validation, the gate, the deadline.

`ToolContext` is a stable interface: fields are only ever added, with defaults, and none changes
what it means; a factory should read only the fields it needs.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType

import httpx
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from aiservices_server.errors import clip
from aiservices_server.startup import StartupError
from aiservices_server.tools.base import Tool, ToolAnnotations, ToolDefinition
from aiservices_server.tools.declared import (
    MAX_DESCRIPTION_CHARS,
    MAX_PERMISSION_CHARS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_INTEGER,
    MAX_SCHEMA_VALUES,
    MAX_TITLE_CHARS,
    MAX_TOOLS,
    NOT_TOOL_PERMISSIONS,
    TOOL_NAME_RULE,
    Problem,
    check_keywords,
    is_valid_tool_name,
)
from aiservices_server.upstream.http import UpstreamLimits
from aiservices_server.upstream.refiner import Refiner

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_SETTING",
    "PLUGIN_SETTINGS_PREFIX",
    "PluginError",
    "ToolContext",
    "check_tool",
    "load_plugin_tools",
    "plugin_settings",
    "settings_prefix",
]

ENTRY_POINT_GROUP = "aiservices.tools"
PLUGINS_SETTING = "AGENTA_AI_SERVICES_PLUGINS"
PLUGIN_SETTINGS_PREFIX = "AGENTA_AI_SERVICES_PLUGIN_"
MAX_PLUGIN_SETTINGS_BYTES = 64 * 1024
"""A plugin's settings, names and values together (UTF-8): plenty for keys, URLs and knobs."""
MAX_TOOLS_PER_PLUGIN = MAX_TOOLS
"""As many as a tools file may declare; a plugin's tools have a tools file's other bounds."""
MAX_SHOWN_CHARS = 200
"""An exception's message, a name or a type in a failure line, at most."""
log = logging.getLogger("aiservices.tools")


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What the service gives a plugin's factory: everything a tool may use, and nothing else.

    - `plugin`: the entry point's name, as `AGENTA_AI_SERVICES_PLUGINS` lists it.
    - `settings`: the plugin's own settings, read-only: each environment variable
      `AGENTA_AI_SERVICES_PLUGIN_<NAME>_<KEY>` as `KEY` (upper case) and its value, NAME being
      the entry point's name upper-cased, every character but letters, digits and `_` as `_`
      (variables of another installed plugin whose prefix extends this one's are left out).
      At most MAX_PLUGIN_SETTINGS_BYTES in all. The factory checks them: raising for a bad one
      stops start-up with a line naming the plugin.
    - `transport`: the service's one HTTP transport for upstream calls (pool limits, no proxy
      settings read from the environment), shared, so a tool needs no client of its own. Build
      `httpx.AsyncClient(transport=...)` or `upstream.http.JsonEndpoint` on it; never close it.
    - `limits`: the upstream bounds the service applies (timeout, retries, reply bytes, and an
      observer that counts each attempt in the service's metrics).
    - `upstream`: the configured upstream (`agenta` or `openai`), or "" when none is complete:
      the service is then disabled and serves no tool at all.
    - `refiner`: the refine port (`upstream.refiner.Refiner`) on the configured upstream, the
      one `tools.agenta.api.refine_prompt` calls; None when no upstream is configured.

    More upstream ports join as optional fields beside `refiner` (None when the configured
    upstream offers none), so a factory written today keeps working.
    """

    plugin: str
    transport: httpx.AsyncBaseTransport
    limits: UpstreamLimits
    settings: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    upstream: str = ""
    refiner: Refiner | None = None
    # More upstream ports go here, each optional (None: not configured), such as the
    # structured chat completion declared tools use (upstream.chat.StructuredChat).


class PluginError(StartupError):
    """A plugin cannot be served: start-up stops. `str()` is the one line to print, naming the
    plugin (entry point and distribution) or the setting, and what went wrong."""


def settings_prefix(name: str) -> str:
    """The prefix of the environment variables that are plugin `name`'s settings."""
    part = "".join(ch if ch.isascii() and (ch.isalnum() or ch == "_") else "_" for ch in name)
    return f"{PLUGIN_SETTINGS_PREFIX}{part.upper()}_"


def plugin_settings(
    name: str, environ: Mapping[str, str], *, others: Iterable[str] = ()
) -> Mapping[str, str]:
    """Plugin `name`'s settings in `environ`: a read-only mapping of KEY (upper case) to value.
    Names are matched without regard to case, as the server's own settings are. `others` are
    the other plugins installed: the settings of one whose prefix extends this one's (`acme-v2`
    beside `acme`) are its own, not this plugin's. ValueError, in words for the failure line,
    when two names differ only in case or the settings are larger than
    MAX_PLUGIN_SETTINGS_BYTES."""
    prefix = settings_prefix(name)
    longer = [
        other
        for other in map(settings_prefix, others)
        if len(other) > len(prefix) and other.startswith(prefix)
    ]
    found: dict[str, str] = {}
    size = 0
    for variable, value in environ.items():
        upper = variable.upper()
        if not upper.startswith(prefix) or len(upper) == len(prefix):
            continue
        if any(upper.startswith(other) for other in longer):
            continue
        key = upper[len(prefix) :]
        if key in found:
            raise ValueError(
                f"its setting {prefix}{key} is set twice, in names that differ in case"
            )
        size += len(variable.encode("utf-8", "surrogateescape"))
        size += len(value.encode("utf-8", "surrogateescape"))
        if size > MAX_PLUGIN_SETTINGS_BYTES:
            raise ValueError(
                f"its settings ({prefix}*) hold more than {MAX_PLUGIN_SETTINGS_BYTES:,} bytes"
            )
        found[key] = value
    return MappingProxyType(found)


def load_plugin_tools(
    context: ToolContext,
    *,
    selected: Sequence[str] | None,
    environ: Mapping[str, str],
    reserved_names: frozenset[str],
) -> list[Tool]:
    """The tools of the selected plugins, checked, in the order the plugins are loaded.

    `context` is what every factory gets, with its own `plugin` and `settings` (from
    `environ`) filled in. `selected` is `AGENTA_AI_SERVICES_PLUGINS` (None: every installed
    plugin, in name order); `reserved_names` are the tools served otherwise, whose names no
    plugin's tool may take. One "plugin loaded" line each, naming its tools. PluginError for
    the first problem.
    """
    available = _by_name(entry_points(group=ENTRY_POINT_GROUP))
    names = sorted(available) if selected is None else _selected(selected, available)
    owners: dict[str, str] = {name: "a built-in tool" for name in reserved_names}
    tools: list[Tool] = []
    for name in names:
        entry_point = _only(available[name])
        plugin = _describe_plugin(entry_point)
        try:
            settings = plugin_settings(name, environ, others=available)
        except ValueError as exc:
            raise PluginError(f"{plugin}: {exc}") from None
        made = _run_factory(entry_point, replace(context, plugin=name, settings=settings), plugin)
        for tool in made:
            tool_name = tool.definition.name
            if tool_name in owners:
                raise PluginError(
                    f"{plugin}: tool {tool_name}: name: already taken by {owners[tool_name]}"
                )
            owners[tool_name] = plugin
            tools.append(tool)
        log.info(
            "plugin loaded",
            extra={
                "plugin": name,
                "distribution": _distribution(entry_point),
                "tools": [tool.definition.name for tool in made],
            },
        )
    return tools


def _by_name(entries: Iterable[EntryPoint]) -> dict[str, list[EntryPoint]]:
    """The entry points by name (two distributions may use one name)."""
    found: dict[str, list[EntryPoint]] = {}
    for entry_point in entries:
        found.setdefault(entry_point.name, []).append(entry_point)
    return found


def _only(entries: list[EntryPoint]) -> EntryPoint:
    """The one entry point of a name that is to be loaded; PluginError when two distributions
    declare it, since which one Python imports depends on the order of the import path."""
    if len(entries) > 1:
        first, second = entries[:2]
        raise PluginError(
            f"plugin {_shown(first.name)}: installed twice, by {_distribution(first)} and "
            f"{_distribution(second)}: uninstall one, or leave it out of {PLUGINS_SETTING}"
        )
    return entries[0]


def _selected(selected: Sequence[str], available: Mapping[str, object]) -> list[str]:
    for name in selected:
        if name not in available:
            known = ", ".join(_shown(n) for n in sorted(available)[:20]) or "none"
            raise PluginError(
                f"invalid setting {PLUGINS_SETTING}: no plugin named {_shown(name)!r} is "
                f"installed (installed: {known})"
            )
    return list(dict.fromkeys(selected))


def _run_factory(entry_point: EntryPoint, context: ToolContext, plugin: str) -> list[Tool]:
    """Import the plugin, call its factory and check every tool it returns."""
    try:
        factory = entry_point.load()
    except (Exception, SystemExit) as exc:
        raise PluginError(
            f"{plugin}: failed to load {_shown(entry_point.value)}: {_error(exc)}"
        ) from None
    if not callable(factory):
        raise PluginError(f"{plugin}: {_shown(entry_point.value)} is not a callable factory")
    if inspect.iscoroutinefunction(factory):
        raise PluginError(f"{plugin}: the factory is async: it must return its tools directly")
    try:
        returned = factory(context)
    except (Exception, SystemExit) as exc:
        raise PluginError(f"{plugin}: the factory raised {_error(exc)}") from None
    if _looks_like_a_tool(returned) or not _iterable(returned):
        raise PluginError(
            f"{plugin}: the factory returned {_type(returned)}, not an iterable of tools"
        )
    try:
        made = list(itertools.islice(returned, MAX_TOOLS_PER_PLUGIN + 1))
    except (Exception, SystemExit) as exc:
        raise PluginError(f"{plugin}: iterating over the tools raised {_error(exc)}") from None
    if len(made) > MAX_TOOLS_PER_PLUGIN:
        raise PluginError(f"{plugin}: the factory returned more than {MAX_TOOLS_PER_PLUGIN} tools")
    tools: list[Tool] = []
    for index, item in enumerate(made):
        try:
            tools.append(check_tool(item))
        except ValueError as exc:
            raise PluginError(f"{plugin}: tool {_tool_label(item, index)}: {exc}") from None
    return tools


def check_tool(item: object) -> Tool:
    """`item` as a Tool once it passes the checks every plugin's tool passes at start-up: a
    `definition` that is a ToolDefinition with a valid name, title, description, permission and
    schemas (JSON objects of `type: object`, valid JSON Schema draft 2020-12), and an async
    `call`. ValueError naming the field and the rule it breaks. A plugin's own tests may call
    it on the tools its factory returns."""
    try:
        definition = getattr(item, "definition")  # noqa: B009 (a plugin's property may raise)
    except AttributeError:
        raise ValueError(f"{_type(item)} has no definition: not a tool") from None
    except Exception as exc:
        raise ValueError(f"definition: raised {_error(exc)}") from None
    if not isinstance(definition, ToolDefinition):
        raise ValueError(f"definition: must be a ToolDefinition, not {_type(definition)}")
    if not inspect.iscoroutinefunction(getattr(item, "call", None)):
        raise ValueError("call: must be an async method: async def call(self, arguments, call)")
    _check_definition(definition)
    return item  # type: ignore[return-value]  # checked above: a definition and an async call


def _check_definition(definition: ToolDefinition) -> None:
    """The rules every served tool follows (the naming rule built-in and declared tools follow,
    schemas the core can validate with and callers can read). ValueError naming the field."""
    if not isinstance(definition.name, str) or not is_valid_tool_name(definition.name):
        raise ValueError(f"name: {TOOL_NAME_RULE}")
    for key, limit in (("title", MAX_TITLE_CHARS), ("description", MAX_DESCRIPTION_CHARS)):
        value = getattr(definition, key)
        if not isinstance(value, str) or not value.strip() or len(value) > limit:
            raise ValueError(f"{key}: must be a string of 1 to {limit:,} characters")
    permission = definition.permission
    if (
        not isinstance(permission, str)
        or not 0 < len(permission) <= MAX_PERMISSION_CHARS
        or not permission.isprintable()
        or any(ch.isspace() for ch in permission)
    ):
        raise ValueError(
            f"permission: must be a name of 1 to {MAX_PERMISSION_CHARS} characters without "
            "spaces, as in the keys file"
        )
    if permission in NOT_TOOL_PERMISSIONS:
        raise ValueError(f"permission: {permission!r} is no tool's permission")
    if not isinstance(definition.annotations, ToolAnnotations):
        raise ValueError(
            f"annotations: must be a ToolAnnotations, not {_type(definition.annotations)}"
        )
    for key in ("input_schema", "output_schema"):
        schema = getattr(definition, key)
        _check_json(schema, key)
        try:
            # The keywords a tools file may use: no regular expression runs on a caller's text.
            check_keywords(schema, key)
        except Problem as problem:
            raise ValueError(f"{problem.field}: {problem.problem}") from None
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"{key}: not a valid JSON Schema: {clip(exc.message, 200)}") from None
        if schema.get("type") != "object":
            raise ValueError(f'{key}.type: must be "object"')


def _check_json(value: object, key: str) -> None:
    """`value` is a JSON object a protobuf Struct holds as is: string keys, JSON types, finite
    numbers, integers a double holds exactly; at most MAX_SCHEMA_DEPTH deep and
    MAX_SCHEMA_VALUES values. Walked with a stack of its own, never by recursion."""
    if not isinstance(value, dict):
        raise ValueError(f"{key}: must be a dict (a JSON object), not {_type(value)}")
    left = MAX_SCHEMA_VALUES
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                raise ValueError(f"{key}: nested deeper than {MAX_SCHEMA_DEPTH}")
            left -= len(item)
            if left < 0:
                raise ValueError(f"{key}: holds more than {MAX_SCHEMA_VALUES:,} values")
            if isinstance(item, dict):
                if not all(isinstance(k, str) for k in item):
                    raise ValueError(f"{key}: every key must be a string")
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        elif item is None or isinstance(item, bool | str):
            continue
        elif isinstance(item, int):
            if abs(item) > MAX_SCHEMA_INTEGER:
                raise ValueError(f"{key}: an integer beyond 2**53 (a double's range)")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{key}: numbers must be finite")
        else:
            raise ValueError(f"{key}: holds {_type(item)}, which is no JSON value")


def _looks_like_a_tool(value: object) -> bool:
    """A single tool returned where an iterable of them belongs (a common slip)."""
    try:
        return isinstance(getattr(value, "definition", None), ToolDefinition)
    except Exception:
        return False


def _iterable(value: object) -> bool:
    return not isinstance(value, str | bytes | bytearray | Mapping) and hasattr(value, "__iter__")


def _describe_plugin(entry_point: EntryPoint) -> str:
    return f"plugin {_shown(entry_point.name)} ({_distribution(entry_point)})"


def _distribution(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    if dist is None:
        return "an unknown distribution"
    try:
        return f"{_shown(str(dist.name))} {_shown(str(dist.version))}"
    except Exception:
        return "a distribution without metadata"


def _tool_label(item: object, index: int) -> str:
    """The tool's name when it has a usable one, else its position (#1 is the first)."""
    try:
        name = item.definition.name  # type: ignore[attr-defined]
    except Exception:
        name = None
    return name if isinstance(name, str) and is_valid_tool_name(name) else f"#{index + 1}"


def _error(exc: BaseException) -> str:
    """An exception as `Type: message`, on one line and bounded; never a traceback."""
    message = _shown(str(exc))
    name = _shown(type(exc).__name__)
    return f"{name}: {message}" if message else name


def _type(value: object) -> str:
    return _shown(type(value).__name__)


def _shown(text: str) -> str:
    """`text` on one line, printable, at most MAX_SHOWN_CHARS characters (a cut one ends with
    "..."); only its first MAX_SHOWN_CHARS + 1 characters are read."""
    head = text[: MAX_SHOWN_CHARS + 1]
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in head).split())
    if len(text) > len(head) or len(flat) > MAX_SHOWN_CHARS:
        return flat[: MAX_SHOWN_CHARS - 3] + "..."
    return flat
