"""Template parsing and variable scanning, for any text a caller or a model can send.

For all four formats: scanning returns the variables or raises TemplateError, nothing else,
within a deadline per example, and finds exactly the variables of templates assembled from
known names. Curly and mustache scanning also agrees with the regexes it replaced, on text
short enough for those to finish. Hostile inputs up to the 100,000-character limit are kept
as explicit examples: runs that made those regexes backtrack for seconds to hours, jinja2
token floods and long tokens, and constant expressions that jinja2 would evaluate while
analysing a template.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import jinja2
import jinja2.meta
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiservices_server.tools.refine_prompt import MAX_TEMPLATE_CHARS
from aiservices_server.tools.templates import (
    JINJA2_MAX_TOKENS,
    PromptTemplate,
    TemplateError,
    TemplateFormat,
    parse_template,
    template_variables,
)

CURLY = TemplateFormat.CURLY
FSTRING = TemplateFormat.FSTRING
JINJA2 = TemplateFormat.JINJA2
MUSTACHE = TemplateFormat.MUSTACHE
LIMIT = MAX_TEMPLATE_CHARS

# Per example: several times the slowest input found (about 35 ms, a 100,000-digit jinja2
# number), for a loaded CI machine, and far below what the worst cases cost before: seconds
# to hours of backtracking, seconds and gigabytes of constant folding.
DEADLINE = timedelta(milliseconds=300)

# The patterns the scanner replaced: the reference for its semantics. They backtrack (time
# cubic in a run of whitespace after `{{`), so they only ever see the short texts made here.
OLD_CURLY = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
OLD_MUSTACHE = re.compile(r"\{\{(\{?)\s*([#^&]?)\s*([^{}!>/=]+?)\s*\}?\}\}")

F = TypeVar("F", bound=Callable[..., Any])

template_variables(["{{ warm }}"], JINJA2)  # jinja2 loads on first use: not part of a deadline


def fill(unit: str, size: int = LIMIT) -> str:
    """`unit` repeated to exactly `size` characters."""
    return (unit * (size // len(unit) + 1))[:size]


def nested_concat(depth: int) -> str:
    """A jinja2 expression whose constant value doubles in length at every level."""
    expression = '"\\\\"'
    for _ in range(depth):
        expression = f'([{expression}] ~ "")'
    return expression


WORST_CASES: list[tuple[str, TemplateFormat]] = [
    # Whitespace after an opener that never closes: the old regexes retried every split of it.
    *[("{{" + " " * (LIMIT - 2), f) for f in TemplateFormat],
    ("{{" + "\t" * (LIMIT - 2), CURLY),
    ("{{" + "\u00a0" * (LIMIT - 2), MUSTACHE),
    *[(opener + " " * (LIMIT - len(opener)), MUSTACHE) for opener in ("{{{", "{{#", "{{&", "{{ #")],
    ("{{x" + " " * (LIMIT - 5) + "}}", CURLY),
    # Runs of braces and tags: as many candidates as characters.
    *[
        (fill(unit), f)
        for unit in ("{{", "}}", "{", "{{}}", "{{a}}", "{{ a", "{{{a}}}")
        for f in TemplateFormat
    ],
    (fill("{{#a}}{{/a}}"), MUSTACHE),
    ("".join(f"{{{{v{i}}}}}" for i in range(LIMIT // 8))[:LIMIT], CURLY),
    ("".join(f"{{{{v{i}}}}}" for i in range(LIMIT // 8))[:LIMIT], MUSTACHE),
    # fstring: fields nested in format specs, unbalanced nesting.
    (fill("{a:{b:{c}}}"), FSTRING),
    (fill("{:{}}"), FSTRING),
    ("{" * (LIMIT // 2) + "}" * (LIMIT // 2), FSTRING),
    ("{a:" + "{" * (LIMIT - 3), FSTRING),
    # jinja2: token floods (cost per token), long single tokens (cost per character).
    ("{{ " + fill("a,", LIMIT - 8) + "a }}", JINJA2),
    ("{{ " + fill("a~", LIMIT - 8) + "a }}", JINJA2),
    ("{{ a" + fill("|f", LIMIT - 8) + " }}", JINJA2),
    ("{{ " + fill("a.", LIMIT - 8) + "a }}", JINJA2),
    (fill("{{a}}"), JINJA2),
    (fill("{% if a %}x{% endif %}"), JINJA2),
    ("".join(f"{{{{ v{i} }}}}" for i in range(LIMIT // 9))[:LIMIT], JINJA2),
    ("{{ " + "9" * (LIMIT - 6) + " }}", JINJA2),
    ("{{ " + "9" * (LIMIT - 7) + "_ }}", JINJA2),
    ('{{ "' + fill("\\a", LIMIT - 4), JINJA2),
    # jinja2: nesting deeper than the parser's recursion.
    ("{{ " + "(" * (LIMIT - 3), JINJA2),
    ("{{ " + "(" * 3000 + "x" + ")" * 3000 + " }}", JINJA2),
    (fill("{% if a %}"), JINJA2),
    # jinja2: constant expressions its code generator would fold, i.e. evaluate.
    ('{{ "a" * 10**8 }}', JINJA2),
    ('{{ f("a" * 10**8) }}', JINJA2),
    ('{{ "x"|center(10**8) }}', JINJA2),
    ('{% set x = "a" * 10**8 %}', JINJA2),
    ('{% autoescape "a" * 10**8 %}x{% endautoescape %}', JINJA2),
    ("{{ " + nested_concat(24) + " }}", JINJA2),
    ("{% autoescape " + nested_concat(24) + " %}{% endautoescape %}", JINJA2),
]


def with_worst_cases(test: F) -> F:
    """`@example` for each of WORST_CASES."""
    for text, template_format in reversed(WORST_CASES):
        test = example(text=text, template_format=template_format)(test)
    return test


ERRORS = {
    "has unbalanced braces for template_format fstring",
    "is not valid jinja2",
    f"is too long for template_format jinja2: more than {JINJA2_MAX_TOKENS} tokens",
}
TEMPLATE_TEXT = st.text(
    alphabet=st.sampled_from("{}{}{}#^&!>/=%:[]().'\"\\|~-+* \t\nab09_") | st.characters(),
    max_size=300,
)


@settings(deadline=DEADLINE, max_examples=300)
@given(text=TEMPLATE_TEXT, template_format=st.sampled_from(TemplateFormat))
@with_worst_cases
def test_any_text_scans_to_variables_or_a_template_error(
    text: str, template_format: TemplateFormat
) -> None:
    try:
        found = template_variables([text], template_format)
    except TemplateError as error:
        assert str(error) in ERRORS  # says what is wrong, never quotes the text
    else:
        assert all(isinstance(name, str) and name for name in found)


# --- curly ---------------------------------------------------------------------------------

SHORT_TEXT = st.text(alphabet="{{{}}}  \t\u00a0\u2003ab#^&!>/=", max_size=40)


def old_curly(text: str) -> set[str]:
    """What the old regex found, less tags of whitespace only (it named them by their last
    whitespace character)."""
    return {m.group(1) for m in OLD_CURLY.finditer(text) if m.group(1).strip()}


@settings(deadline=DEADLINE, max_examples=1000)
@given(SHORT_TEXT)
@example("{{{name}}}")
@example("{{ a }}}} {{b}}")
@example("{{a{b}} {{}} {{ }}")
def test_curly_scanner_agrees_with_the_regex_it_replaced(text: str) -> None:
    assert template_variables([text], CURLY) == old_curly(text)


NO_BRACES = st.text(st.characters(blacklist_characters="{}", blacklist_categories=["Cs"]))
WHITESPACE = st.text(alphabet=" \t\n\u00a0\u2003", max_size=3)
NAMES = NO_BRACES.map(str.strip).filter(bool)


@settings(deadline=DEADLINE)
@given(st.lists(st.tuples(NO_BRACES, WHITESPACE, NAMES, WHITESPACE), max_size=8), NO_BRACES)
def test_curly_finds_the_name_of_every_tag(
    parts: list[tuple[str, str, str, str]], tail: str
) -> None:
    text = "".join(f"{text}{{{{{left}{name}{right}}}}}" for text, left, name, right in parts)
    assert template_variables([text + tail], CURLY) == {name for _, _, name, _ in parts}


# --- mustache ------------------------------------------------------------------------------


def old_mustache(text: str) -> set[str]:
    """What the old regex found, less tags of whitespace or a bare sigil only (it named them
    by a whitespace character or the sigil)."""
    found = set()
    for match in OLD_MUSTACHE.finditer(text):
        sigil, name = match.group(2), match.group(3)
        if name.strip() and not (sigil == "" and name in ("#", "^", "&")):
            found.add(sigil.replace("&", "") + name)
    return found


@settings(deadline=DEADLINE, max_examples=1000)
@given(SHORT_TEXT)
@example("{{{name}}} {{& raw}} {{#items}}{{label}}{{/items}} {{^none}}{{/none}}")
@example("{{! comment}} {{> partial}} {{=<% %>=}} {{# }} {{&}} {{ ^ x }}")
@example("{{& #x}} {{##x}} {{name}}} {{{{name}}")
def test_mustache_scanner_agrees_with_the_regex_it_replaced(text: str) -> None:
    assert template_variables([text], MUSTACHE) == old_mustache(text)


MUSTACHE_NAMES = (
    st.text(st.characters(blacklist_characters="{}!>/=#^&", blacklist_categories=["Cs"]))
    .map(str.strip)
    .filter(bool)
)
# (opener, closer, what the tag declares: "" for nothing, else a prefix for the name)
MUSTACHE_TAGS = [
    ("{{", "}}", ""),
    ("{{{", "}}}", ""),
    ("{{&", "}}", ""),
    ("{{#", "}}", "#"),
    ("{{^", "}}", "^"),
    ("{{/", "}}", None),
    ("{{!", "}}", None),
    ("{{>", "}}", None),
]


@settings(deadline=DEADLINE)
@given(
    st.lists(
        st.tuples(NO_BRACES, st.sampled_from(MUSTACHE_TAGS), WHITESPACE, MUSTACHE_NAMES),
        max_size=8,
    ),
)
def test_mustache_finds_variables_and_sections_but_not_other_tags(
    parts: list[tuple[str, tuple[str, str, str | None], str, str]],
) -> None:
    text = "".join(
        f"{t}{opener}{pad}{name}{pad}{closer}" for t, (opener, closer, _), pad, name in parts
    )
    expected = {prefix + name for _, (_, _, prefix), _, name in parts if prefix is not None}
    assert template_variables([text], MUSTACHE) == expected


# --- fstring -------------------------------------------------------------------------------

FIELDS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@settings(deadline=DEADLINE)
@given(
    st.lists(
        st.one_of(
            NO_BRACES,
            st.sampled_from(["{{", "}}"]),
            FIELDS.map(lambda field: "{" + field + "}"),
            st.tuples(FIELDS, FIELDS).map(lambda pair: f"{{{pair[0]}:>{{{pair[1]}}}}}"),
            st.tuples(FIELDS, FIELDS).map(lambda pair: f"{{{pair[0]}!r:{{{pair[1]}}}}}"),
        ),
        max_size=10,
    )
)
def test_fstring_finds_fields_and_fields_nested_in_specs(parts: list[str]) -> None:
    expected = {name for part in parts if part not in ("{{", "}}") for name in fields_of(part)}
    assert template_variables(["".join(parts)], FSTRING) == expected


def fields_of(part: str) -> list[str]:
    if not part.startswith("{"):
        return []
    return re.findall(r"[A-Za-z_][A-Za-z0-9_]*", part.replace("!r", ""))


def test_fstring_with_unbalanced_braces_is_a_template_error() -> None:
    for text in ("{oops", "oops}", "{a:{b}", "{" * 1001):
        with pytest.raises(TemplateError, match="unbalanced braces"):
            template_variables([text], FSTRING)


# --- jinja2 --------------------------------------------------------------------------------

JINJA_NAMES = st.sampled_from(["a", "b", "item", "user_name", "x1", "loop", "range", "caller"])
JINJA_EXPRESSIONS = st.recursive(
    JINJA_NAMES | st.sampled_from(["1", '"s"', "none", "[]"]),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda pair: f"{pair[0]} ~ {pair[1]}"),
        st.tuples(inner, inner).map(lambda pair: f"({pair[0]} + {pair[1]})"),
        st.tuples(inner, JINJA_NAMES).map(lambda pair: f"{pair[0]}.{pair[1]}"),
        inner.map(lambda expression: f"{expression}|upper"),
        inner.map(lambda expression: f"[{expression}]"),
        st.tuples(JINJA_NAMES, inner).map(lambda pair: f"{pair[0]}({pair[1]})"),
    ),
    max_leaves=4,
)
JINJA_TEMPLATES = st.recursive(
    st.text(alphabet="ab \n", max_size=5) | JINJA_EXPRESSIONS.map(lambda e: "{{ " + e + " }}"),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map("".join),
        st.tuples(JINJA_EXPRESSIONS, inner).map(lambda p: f"{{% if {p[0]} %}}{p[1]}{{% endif %}}"),
        st.tuples(JINJA_NAMES, JINJA_EXPRESSIONS, inner).map(
            lambda p: f"{{% for {p[0]} in {p[1]} %}}{p[2]}{{% endfor %}}"
        ),
        st.tuples(JINJA_NAMES, JINJA_EXPRESSIONS).map(lambda p: f"{{% set {p[0]} = {p[1]} %}}"),
        st.tuples(JINJA_EXPRESSIONS, inner).map(
            lambda p: f"{{% autoescape {p[0]} %}}{p[1]}{{% endautoescape %}}"
        ),
    ),
    max_leaves=6,
)


@settings(deadline=DEADLINE, max_examples=300)
@given(JINJA_TEMPLATES)
@example("Hi {{ name }}{% if topic %} about {{ topic|upper }}{% endif %}")
@example("{% for x in items %}{{ x.a }}{{ y }}{% endfor %}{% set a = 1 %}{{ a }}")
def test_jinja2_finds_what_jinja2_meta_finds(text: str) -> None:
    """The same variables, or the same refusal, as `jinja2.meta.find_undeclared_variables`,
    which evaluates constant expressions on the way: harmless for these small ones."""
    try:
        reference = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(text))
    except jinja2.TemplateError:
        with pytest.raises(TemplateError, match="not valid jinja2"):
            template_variables([text], JINJA2)
    else:
        assert template_variables([text], JINJA2) == reference


@pytest.mark.parametrize(
    ("text", "variables"),
    [
        ('{{ "a" * 10**8 }}{{ b }}', {"b"}),
        ('{{ f("a" * 10**8) }}', {"f"}),
        ('{{ "x"|center(10**8) }}', set()),
        ('{% set x = "a" * 10**8 %}{{ x }}{{ y }}', {"y"}),
        ('{% autoescape "a" * 10**8 %}{{ q }}{% endautoescape %}', {"q"}),
        ("{{ " + nested_concat(22) + " }}", set()),
    ],
)
def test_jinja2_constant_expressions_are_not_evaluated(text: str, variables: set[str]) -> None:
    """Evaluated, each of these allocates 100 MB or more (and with 10**10, gigabytes)."""
    tracemalloc.start()
    try:
        assert template_variables([text], JINJA2) == variables
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024


def test_jinja2_tokens_are_counted_across_messages() -> None:
    tag = "{{ a }} "  # four tokens: begin, name, end, text
    within = [tag * 40] * 10
    assert template_variables(within, JINJA2) == {"a"}
    over = [tag * (JINJA2_MAX_TOKENS // 4)] * 2
    with pytest.raises(TemplateError, match=f"more than {JINJA2_MAX_TOKENS} tokens"):
        template_variables(over, JINJA2)


def test_jinja2_messages_without_tags_cost_no_tokens() -> None:
    plain = ["Plain text, no tags at all."] * 10_000
    assert template_variables([*plain, "{{ a }}"], JINJA2) == {"a"}


def test_jinja2_errors_are_template_errors() -> None:
    for text in ("{{ ", "{% if a %}", "{{ x|no_such_filter }}", "{{ " + "9" * 5000 + " }}"):
        with pytest.raises(TemplateError, match="not valid jinja2"):
            template_variables([text], JINJA2)


# --- whole templates -----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEMPLATE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", ""]) | JSON_VALUES},
    optional={"content": TEMPLATE_TEXT | JSON_VALUES},
)
DOCUMENTS = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=4) | JSON_VALUES},
    optional={"template_format": st.sampled_from([f.value for f in TemplateFormat]) | JSON_VALUES},
)


def document(contents: list[Any], template_format: TemplateFormat) -> str:
    return json.dumps(
        {
            "messages": [{"role": "user", "content": content} for content in contents],
            "template_format": template_format.value,
        },
        ensure_ascii=False,
    )


def at_limit(contents: Callable[[int], list[Any]], template_format: TemplateFormat) -> str:
    """The longest template of at most LIMIT characters whose messages are `contents(size)`."""
    size = LIMIT
    while len(text := document(contents(size), template_format)) > LIMIT:
        size -= max(1, (len(text) - LIMIT) * size // len(text))
    return text


def first_characters(text: str) -> Callable[[int], list[Any]]:
    return lambda size: [text[:size]]


def parse_worst_cases(test: F) -> F:
    """Whole templates at the size limit: hostile content, many messages, many parts."""
    cases = [at_limit(first_characters(text), f) for text, f in WORST_CASES]
    cases += [at_limit(lambda n: ["{{ a }}"] * (n // 40), f) for f in TemplateFormat]
    cases += [at_limit(lambda n: [""] * (n // 30), f) for f in TemplateFormat]
    part = {"type": "text", "text": "{{a}}"}
    cases += [at_limit(lambda n: [[part] * (n // 30)], f) for f in TemplateFormat]
    cases += ["[" * LIMIT, '{"messages": ' + "[" * (LIMIT - 20)]
    for case in reversed(cases):
        assert len(case) <= LIMIT
        test = example(case)(test)
    return test


@settings(deadline=DEADLINE, max_examples=300)
@given(DOCUMENTS.map(json.dumps) | TEMPLATE_TEXT)
@parse_worst_cases
def test_any_template_parses_or_is_a_template_error(text: str) -> None:
    try:
        template = parse_template(text)
    except TemplateError as error:
        assert str(error)
    else:
        assert isinstance(template, PromptTemplate)
        assert template.messages
        assert template.variables == template_variables(
            (m.content for m in template.messages), template.template_format
        )
