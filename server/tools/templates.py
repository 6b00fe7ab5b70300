"""Prompt templates as Agenta stores them: a JSON object with `messages` and a
`template_format`, and the variables each format declares."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Any

import orjson


class TemplateFormat(StrEnum):
    CURLY = "curly"
    FSTRING = "fstring"
    JINJA2 = "jinja2"
    MUSTACHE = "mustache"


class TemplateError(ValueError):
    """The template cannot be used; the message describes the problem, never the text."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class PromptTemplate:
    messages: tuple[Message, ...]
    template_format: TemplateFormat
    # Found once at parse time: also what proves the template parses in its own format.
    variables: frozenset[str]

    @property
    def roles(self) -> list[str]:
        return [message.role for message in self.messages]


def _content_text(content: Any, where: str) -> str:
    """Content is a string or a list of parts; text parts are joined in order."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict):
                raise TemplateError(f"{where}.content[{index}] must be an object")
            if part.get("type", "text") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise TemplateError(f"{where}.content[{index}].text must be a string")
                texts.append(text)
        return "\n".join(texts)
    raise TemplateError(f"{where}.content must be a string or a list of text parts")


def parse_template(text: str) -> PromptTemplate:
    try:
        document = orjson.loads(text)
    except (ValueError, RecursionError):
        raise TemplateError("is not valid JSON") from None
    if not isinstance(document, dict):
        raise TemplateError("must be a JSON object")
    raw_format = document.get("template_format") or TemplateFormat.CURLY.value
    try:
        template_format = TemplateFormat(raw_format)
    except (ValueError, TypeError):
        allowed = ", ".join(f.value for f in TemplateFormat)
        raise TemplateError(f"template_format must be one of {allowed}") from None
    raw_messages = document.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise TemplateError("must have a non-empty messages list")
    messages = []
    for index, item in enumerate(raw_messages):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise TemplateError(f"{where} must be an object with role and content")
        role = item.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"{where}.role must be a non-empty string")
        if "content" not in item or item["content"] is None:
            raise TemplateError(f"{where}.content is required")
        messages.append(Message(role, _content_text(item["content"], where)))
    variables = template_variables((m.content for m in messages), template_format)
    return PromptTemplate(tuple(messages), template_format, frozenset(variables))


_CURLY = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
# {{name}}, {{{name}}}, {{& name}}, {{#section}}, {{^inverted}}; not comments, partials, closers.
_MUSTACHE = re.compile(r"\{\{(\{?)\s*([#^&]?)\s*([^{}!>/=]+?)\s*\}?\}\}")


def _fstring_fields(text: str, depth: int = 0) -> set[str]:
    """Field names, including those nested in format specs such as `{x:{width}}`."""
    fields: set[str] = set()
    try:
        for _, field, spec, _ in string.Formatter().parse(text):
            if field:
                fields.add(field)
            if spec and depth < 2:
                fields |= _fstring_fields(spec, depth + 1)
    except ValueError:
        raise TemplateError("has unbalanced braces for template_format fstring") from None
    return fields


@cache
def _jinja() -> Any:
    """Loaded on the first jinja2 template: most templates are curly, and jinja2 costs memory."""
    import jinja2  # noqa: PLC0415
    import jinja2.meta  # noqa: PLC0415

    return jinja2, jinja2.Environment(autoescape=False)


def _jinja_fields(text: str) -> set[str]:
    jinja2, environment = _jinja()
    try:
        return set(jinja2.meta.find_undeclared_variables(environment.parse(text)))
    except (jinja2.TemplateError, ValueError, RecursionError):
        raise TemplateError("is not valid jinja2") from None


def template_variables(contents: Iterable[str], template_format: TemplateFormat) -> set[str]:
    found: set[str] = set()
    for text in contents:
        if template_format is TemplateFormat.CURLY:
            found.update(_CURLY.findall(text))
        elif template_format is TemplateFormat.MUSTACHE:
            # A section keeps its sigil: turning {{#items}} into {{items}} breaks the loop.
            found |= {
                match.group(2).replace("&", "") + match.group(3)
                for match in _MUSTACHE.finditer(text)
            }
        elif template_format is TemplateFormat.FSTRING:
            found |= _fstring_fields(text)
        else:
            found |= _jinja_fields(text)
    return found
