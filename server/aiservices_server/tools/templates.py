"""Prompt templates as Agenta stores them: a JSON object with `messages` and a
`template_format`, and the variables each format declares."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Iterator
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


# Characters that end a tag's text. Curly: any brace. Mustache: also the sigils of the tags that
# declare no variable: comments `!`, partials `>`, closers `/` and delimiter changes `=`.
_CURLY_STOPS = frozenset("{}")
_MUSTACHE_STOPS = frozenset("{}!>/=")
# `&` (unescaped) only changes how a value is written; `#` and `^` open a section and are kept.
_MUSTACHE_SIGILS = ("#", "^", "&")


def _tag_texts(text: str, stops: frozenset[str]) -> Iterator[str]:
    """The text of every tag: a non-empty run of characters, none of them in `stops`, that
    directly follows `{{` and directly precedes `}}`.

    So in `{{{name}}}` the tag text is `name`, while `{{a{b}}` and `{{}}` hold none. Linear in
    `text`: one split at every `}}`, then each piece is searched once, from its end, for the
    `{{` that opens its last tag.
    """
    pieces = text.split("}}")
    for piece in pieces[:-1]:  # every piece but the last is followed by `}}`
        _, opener, inner = piece.rpartition("{{")
        if opener and inner and stops.isdisjoint(inner):
            yield inner


def _curly_names(text: str) -> set[str]:
    """Curly variables: `{{ name }}`, the name being the tag text without surrounding
    whitespace. A tag of whitespace only declares nothing."""
    names = {inner.strip() for inner in _tag_texts(text, _CURLY_STOPS)}
    names.discard("")
    return names


def _mustache_name(inner: str) -> str:
    name = inner.strip()
    sigil = name[:1]
    if sigil not in _MUSTACHE_SIGILS:
        return name
    rest = name[1:].lstrip()
    if not rest or sigil == "&":
        return rest
    return sigil + rest


def _mustache_names(text: str) -> set[str]:
    """Mustache variables, by tag: `{{name}}`, `{{{name}}}` and `{{& name}}` give `name`;
    `{{#section}}` and `{{^inverted}}` give `#section` and `^inverted` (the sigil is kept:
    turning a section into a plain variable breaks the template); whitespace around the name
    and after the sigil is dropped. Comments `{{! }}`, partials `{{> }}`, closers `{{/ }}`,
    delimiter changes `{{= =}}`, and tags of whitespace or a bare sigil declare nothing."""
    names = {_mustache_name(inner) for inner in _tag_texts(text, _MUSTACHE_STOPS)}
    names.discard("")
    return names


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


# jinja2 spends several microseconds per token on parsing and analysis, so the messages of one
# template may hold this many tokens in all, which keeps a template's analysis within the event
# loop's budget; parsing stops at the next token. Prompts use a few dozen tags of a handful of
# tokens each.
JINJA2_MAX_TOKENS = 2_000
# What parsing and analysing one message costs besides its tokens, counted in tokens.
_JINJA2_MESSAGE_TOKENS = 10
_JINJA2_TAG_OPENERS = ("{{", "{%", "{#")


class _TokenBudget:
    """Tokens a template may still use; the jinja2 token filter spends them."""

    def __init__(self, tokens: int) -> None:
        self.left = tokens

    def spend(self, tokens: int = 1) -> None:
        self.left -= tokens
        if self.left < 0:
            raise _TooManyTokens


class _TooManyTokens(Exception):
    """Raised through jinja2's parser to stop it; not a jinja2 error, so nothing catches it."""


@cache
def _jinja2_variables() -> Callable[[str, _TokenBudget], set[str]]:
    """The undeclared variables of one message, as `jinja2.meta.find_undeclared_variables`
    finds them but without evaluating anything, each token charged to the budget; raises
    TemplateError or _TooManyTokens.

    jinja2's code generator folds constant expressions as it goes: `{{ "a" * 10**10 }}`, a
    filter on a literal, a nested `[...] ~ ""` that doubles at each level, an `autoescape`
    value. For a 30-character template that is any amount of time and memory, so the variable
    finder runs with no optimizer, keeps `autoescape` values unevaluated, and the environment's
    `finalize` takes the render context, which stops output from being folded.

    Loaded on the first jinja2 template: most templates are curly, and jinja2 costs memory.
    """
    import jinja2  # noqa: PLC0415
    import jinja2.ext  # noqa: PLC0415
    import jinja2.meta  # noqa: PLC0415

    class TokenLimit(jinja2.ext.Extension):
        """Charges each token the lexer hands the parser to `budget`. Every parse runs in an
        overlay of the shared environment, which binds a copy of this extension holding the
        budget of that parse's template."""

        budget = _TokenBudget(0)

        def filter_stream(self, stream: Any) -> Iterator[Any]:
            for token in stream:
                self.budget.spend()
                yield token

    class VariableFinder(jinja2.meta.TrackingCodeGenerator):
        def __init__(self, environment: jinja2.Environment) -> None:
            super().__init__(environment)
            self.optimizer = None

        def visit_EvalContextModifier(self, node: Any, frame: Any) -> None:
            for keyword in node.options:
                self.visit(keyword.value, frame)
            frame.eval_ctx.volatile = True

    @jinja2.pass_context
    def finalize_when_rendered(context: Any, value: Any) -> Any:
        return value

    shared = jinja2.Environment(
        autoescape=False, extensions=[TokenLimit], finalize=finalize_when_rendered
    )

    def variables(text: str, budget: _TokenBudget) -> set[str]:
        environment = shared.overlay()
        limit = environment.extensions[TokenLimit.identifier]
        assert isinstance(limit, TokenLimit)
        limit.budget = budget
        try:
            finder = VariableFinder(environment)
            finder.visit(environment.parse(text))
        except (jinja2.TemplateError, ValueError, RecursionError):
            raise TemplateError("is not valid jinja2") from None
        return set(finder.undeclared_identifiers)

    return variables


def _jinja_fields(contents: Iterable[str]) -> set[str]:
    """Undeclared variables of each message, as jinja2 finds them, within JINJA2_MAX_TOKENS.

    A message without a tag opener is plain text: it declares nothing and cannot fail, so it
    is not parsed and costs nothing.
    """
    variables = _jinja2_variables()
    budget = _TokenBudget(JINJA2_MAX_TOKENS)
    fields: set[str] = set()
    try:
        for text in contents:
            if any(opener in text for opener in _JINJA2_TAG_OPENERS):
                budget.spend(_JINJA2_MESSAGE_TOKENS)
                fields |= variables(text, budget)
    except _TooManyTokens:
        raise TemplateError(
            f"is too long for template_format jinja2: more than {JINJA2_MAX_TOKENS} tokens"
        ) from None
    return fields


def template_variables(contents: Iterable[str], template_format: TemplateFormat) -> set[str]:
    """Every variable the messages declare, in the format's own terms; TemplateError when
    they do not parse in that format (or, for jinja2, hold more than JINJA2_MAX_TOKENS).

    Work is linear in the text: curly and mustache tags are found by a scan without
    backtracking, fstring by Python's own format parser, jinja2 by jinja2 within its bound.
    """
    if template_format is TemplateFormat.JINJA2:
        return _jinja_fields(contents)
    found: set[str] = set()
    for text in contents:
        if template_format is TemplateFormat.CURLY:
            found |= _curly_names(text)
        elif template_format is TemplateFormat.MUSTACHE:
            found |= _mustache_names(text)
        else:
            found |= _fstring_fields(text)
    return found
