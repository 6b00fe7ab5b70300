"""API keys: the keys file, authentication, the authorization header and the `keys` CLI."""

from __future__ import annotations

import hashlib
import hmac
import io
import stat
import subprocess
import tomllib
from datetime import timedelta
from pathlib import Path
from subprocess import CompletedProcess
from tempfile import TemporaryDirectory

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiservices_server.auth import (
    ApiKey,
    KeysFileError,
    KeyStore,
    generate_key,
    hash_key,
    load_keys_file,
    parse_authorization,
)
from aiservices_server.auth.keys import MAX_KEY_LENGTH, is_valid_key_text
from aiservices_server.keys_cli import keys_main
from aiservices_server.ratelimit import RateLimit, gcra
from tests.support.processes import SERVER_COMMAND, clean_env, run_to_exit

KEY_A = "ais_first-key-for-tests_0123456789abcdefghijklmn"
KEY_B = "ais_second-key-for-tests_0123456789abcdefghijklm"
HASH_A = "sha256:" + hashlib.sha256(KEY_A.encode()).hexdigest()
HASH_B = "sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest()

GOOD_FILE = f"""
[[keys]]
id = "svc-a"
hash = "{HASH_A}"
permissions = ["tools.agenta.api.refine_prompt"]

[[keys]]
id = "svc.b_2"
hash = "{HASH_B}"
permissions = ["*"]
organization = "acme"
rate_limit = {{ burst = 30, per_minute = 90 }}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text, encoding="utf-8")
    return path


def key_shown(stderr: str) -> str:
    """The clear key `keys new` showed on stderr (its first line, `key: ...`)."""
    first = stderr.splitlines()[0]
    assert first.startswith("key: ais_"), stderr
    return first.removeprefix("key: ")


def entry(**fields: str) -> str:
    """One [[keys]] table; values are TOML source text, a key set to "" is left out."""
    values = {
        "id": '"svc-a"',
        "hash": f'"{HASH_A}"',
        "permissions": '["tools.x"]',
        **fields,
    }
    return "[[keys]]\n" + "".join(f"{k} = {v}\n" for k, v in values.items() if v)


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(KeysFileError) as info:
        KeyStore.from_file(path)
    message = str(info.value)
    assert message.startswith(f"API keys file {path}: ")
    assert "\n" not in message
    return message.removeprefix(f"API keys file {path}: ")


# --- loading -----------------------------------------------------------------------------------


def test_good_file_loads_every_field(tmp_path: Path) -> None:
    store = KeyStore.from_file(write(tmp_path, GOOD_FILE))

    assert len(store) == 2
    assert store.ids() == ("svc-a", "svc.b_2")
    a = store.authenticate(KEY_A)
    b = store.authenticate(KEY_B)
    assert a == ApiKey(
        id="svc-a",
        digest=hashlib.sha256(KEY_A.encode()).digest(),
        permissions=frozenset({"tools.agenta.api.refine_prompt"}),
        organization=None,
        rate_limit=None,
    )
    assert b is not None
    assert b.id == "svc.b_2"
    assert b.permissions == frozenset({"*"})
    assert b.organization == "acme"
    assert b.rate_limit == RateLimit(burst=30, per_minute=90.0)
    assert isinstance(b.rate_limit.per_minute, float)


def test_principal_carries_the_key_identity() -> None:
    key = ApiKey(
        id="svc-a",
        digest=bytes(32),
        permissions=frozenset({"tools.x"}),
        organization="acme",
    )
    principal = key.principal(user_id="u1")
    assert (principal.key_id, principal.organization, principal.user_id) == ("svc-a", "acme", "u1")
    assert principal.may("tools.x")
    assert not principal.may("tools.y")


def test_repr_never_shows_the_digest() -> None:
    key = ApiKey(id="svc-a", digest=hashlib.sha256(KEY_A.encode()).digest())
    assert HASH_A.removeprefix("sha256:") not in repr(key)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[keys]]\nid = \n", "not valid TOML (line 2, column 6: Invalid value)"),
        ("", "no [[keys]] entries"),
        (entry(hash=""), 'keys[0].hash (key "svc-a"): required field is missing'),
        (entry(permissions=""), 'keys[0].permissions (key "svc-a"): required field is missing'),
        (
            entry(hash='"sha256:ABC"'),
            'keys[0].hash (key "svc-a"): must look like "sha256:<64 lowercase hex digits>"',
        ),
        (
            entry(hash=f'"{HASH_A.upper()}"'),
            'keys[0].hash (key "svc-a"): must look like "sha256:<64 lowercase hex digits>"',
        ),
        (
            entry(hash=f'"{HASH_A.removeprefix("sha256:")}"'),
            'keys[0].hash (key "svc-a"): must look like "sha256:<64 lowercase hex digits>"',
        ),
        (
            entry() + entry(id='"svc-b"', hash=f'"{HASH_B}"') + entry(hash=f'"{HASH_B}"'),
            'keys[2].id: duplicate id "svc-a"',
        ),
        (
            entry() + entry(id='"svc-b"'),
            'keys[1].hash: same hash as key "svc-a"',
        ),
        (entry(permission='["*"]'), 'keys[0].permission (key "svc-a"): unknown field'),
        (entry() + "\n[extra]\nx = 1\n", "extra: unknown field"),
        (entry(permissions='"tools.x"'), 'keys[0].permissions (key "svc-a"): must be an array'),
        (
            entry(permissions='["tools.x", 3]'),
            'keys[0].permissions[1] (key "svc-a"): must be a string',
        ),
        (
            entry(permissions='["tools x"]'),
            'keys[0].permissions[0] (key "svc-a"): must be a non-empty string without spaces',
        ),
        (entry(id='"svc a"'), "keys[0].id: must be 1 to 64 characters from A-Z a-z 0-9 . _ -"),
        (
            entry(id=f'"{"a" * 65}"'),
            "keys[0].id: must be 1 to 64 characters from A-Z a-z 0-9 . _ -",
        ),
        (entry(organization="7"), 'keys[0].organization (key "svc-a"): must be a string'),
        (
            entry(rate_limit="{ burst = 0, per_minute = 90 }"),
            'keys[0].rate_limit.burst (key "svc-a"): must be a positive integer',
        ),
        (
            entry(rate_limit="{ burst = 2.5, per_minute = 90 }"),
            'keys[0].rate_limit.burst (key "svc-a"): must be an integer',
        ),
        (
            entry(rate_limit="{ burst = 3, per_minute = -1.0 }"),
            'keys[0].rate_limit.per_minute (key "svc-a"): must be a positive number',
        ),
        (
            entry(rate_limit="{ burst = 3 }"),
            'keys[0].rate_limit.per_minute (key "svc-a"): required field is missing',
        ),
        (
            entry(rate_limit="{ burst = 3, per_minute = 9, burts = 1 }"),
            'keys[0].rate_limit.burts (key "svc-a"): unknown field',
        ),
        ('[keys]\nid = "a"\n', "keys: must be [[keys]] tables (an array of tables), not [keys]"),
    ],
    ids=lambda value: value if len(value) < 40 else value[:40],
)
def test_malformed_file_gives_one_line(tmp_path: Path, text: str, problem: str) -> None:
    assert load_error(tmp_path, text) == problem


def test_several_problems_report_the_first_and_count(tmp_path: Path) -> None:
    message = load_error(tmp_path, entry(hash='"x"', permissions="", colour='"red"'))
    assert message == (
        'keys[0].hash (key "svc-a"): must look like "sha256:<64 lowercase hex digits>"'
        " (and 2 more problems)"
    )


# Limits the rate limiter cannot hold: each used to load, then fail every call of its key.
UNHOLDABLE_LIMITS = {
    "per_minute 1e-12": ("{ burst = 3, per_minute = 1e-12 }", "per_minute", "is too small"),
    "per_minute 1e12": ("{ burst = 3, per_minute = 1e12 }", "per_minute", "must be at most"),
    "burst 2**62": (f"{{ burst = {2**62}, per_minute = 30 }}", "burst", "must be at most"),
    "burst 0": ("{ burst = 0, per_minute = 30 }", "burst", "must be a positive integer"),
    "burst -1": ("{ burst = -1, per_minute = 30 }", "burst", "must be a positive integer"),
    "per_minute 0": ("{ burst = 3, per_minute = 0 }", "per_minute", "must be a positive number"),
    "per_minute -30": ("{ burst = 3, per_minute = -30.0 }", "per_minute", "must be a positive"),
    "per_minute nan": ("{ burst = 3, per_minute = nan }", "per_minute", "must be a positive"),
    "per_minute inf": ("{ burst = 3, per_minute = inf }", "per_minute", "must be a positive"),
    "per_minute -inf": ("{ burst = 3, per_minute = -inf }", "per_minute", "must be a positive"),
}


@pytest.mark.parametrize("case", list(UNHOLDABLE_LIMITS))
def test_a_limit_the_limiter_cannot_hold_does_not_load(tmp_path: Path, case: str) -> None:
    rate_limit, field, problem = UNHOLDABLE_LIMITS[case]
    second = entry(id='"svc-b"', hash=f'"{HASH_B}"', rate_limit=rate_limit)
    message = load_error(tmp_path, entry() + second)
    assert message.startswith(f'keys[1].rate_limit.{field} (key "svc-b"): {problem}')


def test_the_largest_limits_load_and_work() -> None:
    with TemporaryDirectory() as directory:
        text = entry(rate_limit="{ burst = 1_000_000, per_minute = 6_000_000 }")
        (key,) = load_keys_file(write(Path(directory), text))
    assert key.rate_limit == RateLimit(burst=1_000_000, per_minute=6_000_000.0)
    decision, _ = gcra(None, NOW_US, key.rate_limit)
    assert decision.allowed and decision.remaining == 999_999


NOW_US = 1_700_000_000 * 1_000_000  # a Unix time in microseconds, as the limiter uses


def toml_number(value: float) -> str:
    return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))


@settings(deadline=timedelta(milliseconds=500), max_examples=200)
@given(
    burst=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    per_minute=st.floats() | st.floats(min_value=1e-9, max_value=1e-6),
)
@example(burst=3, per_minute=1e-12)
@example(burst=3, per_minute=1e12)
@example(burst=2**62, per_minute=30.0)
@example(burst=10, per_minute=1e-7)
@example(burst=1, per_minute=60 * 1e6 / 2**50)
@example(burst=1_000_000, per_minute=6_000_000.0)
@example(burst=1_000_001, per_minute=30.0)
@example(burst=3, per_minute=6_000_000.5)
@example(burst=3, per_minute=5e-324)
def test_a_key_limit_loads_exactly_when_the_limiter_can_use_it(
    burst: int, per_minute: float
) -> None:
    text = entry(rate_limit=f"{{ burst = {burst}, per_minute = {toml_number(per_minute)} }}")
    with TemporaryDirectory() as directory:
        try:
            keys = load_keys_file(write(Path(directory), text))
        except KeysFileError as exc:
            assert "\n" not in str(exc)
            assert ".rate_limit." in str(exc)
            with pytest.raises(ValueError):
                RateLimit(burst, per_minute)
            return
    (key,) = keys
    assert key.rate_limit is not None
    limit = key.rate_limit
    decision, tat = gcra(None, NOW_US, limit)
    assert decision.allowed and tat is not None
    # The furthest the stored time can run ahead of now (a spent burst) stays exact in the
    # doubles of the Redis script.
    assert NOW_US + limit.burst * limit.interval_us < 2**53


def test_values_are_never_echoed(tmp_path: Path) -> None:
    """A clear key pasted into `hash` by mistake must not reach the start-up log."""
    assert KEY_A not in load_error(tmp_path, entry(hash=f'"{KEY_A}"'))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(KeysFileError) as info:
        KeyStore.from_file(path)
    assert str(info.value) == f"API keys file {path}: cannot read it (No such file or directory)"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match=r"^API keys file .*: cannot read it \(.+\)$"):
        KeyStore.from_file(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(b'id = "\xff"\n')
    with pytest.raises(KeysFileError, match=r": not valid TOML \(not UTF-8 text\)$"):
        KeyStore.from_file(path)


def test_store_rejects_duplicates_built_in_code() -> None:
    a = ApiKey(id="svc-a", digest=bytes(32))
    with pytest.raises(ValueError, match="duplicate id"):
        KeyStore([a, ApiKey(id="svc-a", digest=bytes([1]) * 32)])
    with pytest.raises(ValueError, match="same hash"):
        KeyStore([a, ApiKey(id="svc-b", digest=bytes(32))])
    with pytest.raises(ValueError, match="32 bytes"):
        ApiKey(id="svc-c", digest=b"short")


# --- authenticate ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> KeyStore:
    return KeyStore(
        [
            ApiKey(id="svc-a", digest=hashlib.sha256(KEY_A.encode()).digest()),
            ApiKey(id="svc-b", digest=hashlib.sha256(KEY_B.encode()).digest()),
        ]
    )


def test_authenticate_right_key(store: KeyStore) -> None:
    found = store.authenticate(KEY_A)
    assert found is not None
    assert found.id == "svc-a"
    other = store.authenticate(KEY_B)
    assert other is not None
    assert other.id == "svc-b"


@pytest.mark.parametrize(
    "presented",
    [
        "ais_wrong",
        KEY_A[:-1] + ("x" if KEY_A[-1] != "x" else "y"),
        "X" + KEY_A[1:],
        KEY_A + " ",
        KEY_A[:-1],
        "",
        HASH_A,
        HASH_A.removeprefix("sha256:"),
    ],
    ids=["wrong", "last-char", "first-char", "trailing-space", "truncated", "empty", "hash", "hex"],
)
def test_authenticate_refuses(store: KeyStore, presented: str) -> None:
    assert store.authenticate(presented) is None


def test_authenticate_uses_constant_time_compare(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final equality test must go through hmac.compare_digest."""
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return False

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert store.authenticate(KEY_A) is None
    assert calls == [(hashlib.sha256(KEY_A.encode()).digest(),) * 2]


def test_store_holds_no_clear_key(store: KeyStore) -> None:
    for key in store:
        assert KEY_A not in repr(vars(key))
        assert KEY_B not in repr(vars(key))
    assert KEY_A not in repr(store)


# --- parse_authorization -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"Bearer {KEY_A}", KEY_A),
        (f"ApiKey {KEY_A}", KEY_A),
        (f"bearer {KEY_A}", KEY_A),
        (f"APIKEY {KEY_A}", KEY_A),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        (f"Bearer {KEY_A} extra", None),
        (f"Bearer  {KEY_A}", None),
        (f"Basic {KEY_A}", None),
        (KEY_A, None),
        ("Bearer ais_\u00e9", None),
        ("Bearer ais_\x01x", None),
        ("Bearer " + "a" * 1025, None),
    ],
    ids=[
        "bearer",
        "apikey",
        "lower-case",
        "upper-case",
        "missing",
        "empty",
        "scheme-only",
        "empty-key",
        "two-tokens",
        "two-spaces",
        "basic",
        "no-scheme",
        "non-ascii",
        "control-char",
        "too-long",
    ],
)
def test_parse_authorization(value: str | None, expected: str | None) -> None:
    assert parse_authorization(value) == expected


# Header text as a caller may send it: grpc bounds metadata to a few KB; 100,000 is far beyond.
HEADER_TEXT = st.text(st.characters(codec="utf-8"), max_size=2_000)
PRESENTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@settings(deadline=timedelta(milliseconds=200))
@given(
    HEADER_TEXT
    | st.builds(lambda s, k: f"{s} {k}", st.sampled_from(["Bearer", "ApiKey"]), HEADER_TEXT)
)
@example("Bearer " + " " * 100_000)
@example("Bearer" + " x" * 50_000)
@example(" \t" * 50_000 + "Bearer k")
@example("Bearer " + "k" * 100_000)
@example("Bearer " + "\u00e9" * 50_000)
def test_parse_authorization_gives_a_presentable_key_behind_one_scheme_or_nothing(
    value: str,
) -> None:
    key = parse_authorization(value)
    if key is not None:
        scheme, _, rest = value.strip(" \t").partition(" ")
        assert scheme.lower() in {"bearer", "apikey"}
        assert rest == key
        assert is_valid_key_text(key)


@settings(deadline=timedelta(milliseconds=200))
@given(
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "ApiKey", "apikey", "APIKEY"]),
    key=PRESENTABLE.filter(lambda k: len(k) <= MAX_KEY_LENGTH),
    before=st.text(" \t", max_size=3),
    after=st.text(" \t", max_size=3),
)
def test_parse_authorization_finds_every_presentable_key(
    scheme: str, key: str, before: str, after: str
) -> None:
    assert parse_authorization(f"{before}{scheme} {key}{after}") == key


# --- generate_key / hash_key -------------------------------------------------------------------


def test_generate_key_is_prefixed_random_and_presentable() -> None:
    key = generate_key()
    assert key.startswith("ais_")
    assert len(key) == 4 + 43
    assert key != generate_key()
    assert parse_authorization(f"Bearer {key}") == key


def test_hash_key_format() -> None:
    assert hash_key(KEY_A) == HASH_A
    assert hash_key("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# --- CLI ---------------------------------------------------------------------------------------


def test_keys_new_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = keys_main(
        [
            "new",
            "--id",
            "svc-new",
            "--permission",
            "tools.agenta.api.refine_prompt",
            "--permission",
            "*",
            "--organization",
            'ac"me',
            "--burst",
            "5",
            "--per-minute",
            "12.5",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0

    # stdout is the entry alone, so `keys new ... >> keys.toml` leaves a valid file; the key is
    # shown on stderr, once.
    key = key_shown(captured.err)
    assert "only once" in captured.err
    assert captured.out.startswith("[[keys]]\n")
    assert key not in captured.out

    store = KeyStore.from_file(write(tmp_path, captured.out))
    found = store.authenticate(key)
    assert found is not None
    assert found.id == "svc-new"
    assert found.permissions == frozenset({"tools.agenta.api.refine_prompt", "*"})
    assert found.organization == 'ac"me'
    assert found.rate_limit == RateLimit(burst=5, per_minute=12.5)
    assert store.authenticate(generate_key()) is None


def test_keys_new_minimal_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_main(["new", "--id", "svc-min", "--permission", "edit_workflows"]) == 0
    captured = capsys.readouterr()
    key = key_shown(captured.err)
    assert tomllib.loads(captured.out)["keys"][0].keys() == {"id", "hash", "permissions"}
    found = KeyStore.from_file(write(tmp_path, captured.out)).authenticate(key)
    assert found is not None
    assert (found.organization, found.rate_limit) == (None, None)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required"),
        (["rotate"], "invalid choice"),
        (["new", "--permission", "x"], "--id"),
        (["new", "--id", "svc-a"], "--permission"),
        (["new", "--id", "svc a", "--permission", "x"], "--id must be 1 to 64 characters"),
        (["new", "--id", "a" * 65, "--permission", "x"], "--id must be 1 to 64 characters"),
        (["new", "--id", "a", "--permission", ""], "--permission must be a non-empty"),
        (["new", "--id", "a", "--permission", "x", "--burst", "3"], "go together"),
        (["new", "--id", "a", "--permission", "x", "--per-minute", "3"], "go together"),
        (
            ["new", "--id", "a", "--permission", "x", "--burst", "0", "--per-minute", "3"],
            "--burst must be a positive integer",
        ),
        (
            ["new", "--id", "a", "--permission", "x", "--burst", "2", "--per-minute", "nan"],
            "--per-minute must be a positive number",
        ),
        (
            ["new", "--id", "a", "--permission", "x", "--burst", "2", "--per-minute", "1e12"],
            "--per-minute must be at most 6,000,000",
        ),
        (
            ["new", "--id", "a", "--permission", "x", "--burst", "2", "--per-minute", "1e-12"],
            "--per-minute is too small for the burst",
        ),
        (["new", "--id", "a", "--permission", "x", "--burst", "two", "--per-minute", "3"], "int"),
    ],
)
def test_keys_bad_usage(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("aiservices-server keys")
    assert fragment in captured.err


def test_keys_hash_reads_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(KEY_A + "\n"))
    assert keys_main(["hash"]) == 0
    assert capsys.readouterr().out == HASH_A + "\n"


@pytest.mark.parametrize(
    ("stdin", "fragment"),
    [("", "no key"), ("\n  \n", "no key"), ("a\nb\n", "one key"), ("a b\n", "printable ASCII")],
)
def test_keys_hash_bad_input(
    stdin: str,
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert keys_main(["hash"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert fragment in captured.err


# --- keys list / keys revoke, through the real command line ------------------------------------

KEY_C = "ais_third-key-for-tests_0123456789abcdefghijklmno"

COMMENTED_FILE = f"""# aiservices keys: one table per caller

# billing, owned by team A
[[keys]]
id = "svc-a"
hash = "{HASH_A}"
permissions = ["tools.x"]

# reporting, owned by team B
[[keys]]
id = "svc.b_2"
hash = "{HASH_B}"
permissions = ["*", "edit_workflows"]
organization = "acme"
rate_limit = {{ burst = 30, per_minute = 90 }}

[[keys]]
id = "svc-c"
hash = "{hash_key(KEY_C)}"
permissions = ["tools.y"]
"""


def run_keys(cwd: Path, *args: str, keys_file: Path | None = None) -> CompletedProcess[str]:
    """`aiservices-server keys ARGS`, with API_KEYS_FILE set to `keys_file` when given."""
    settings = {} if keys_file is None else {"API_KEYS_FILE": str(keys_file)}
    return run_to_exit(cwd, settings, "keys", *args)


def test_keys_list_prints_each_entry_without_its_hash(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_FILE)
    path.chmod(0o600)
    done = run_keys(tmp_path, "list", "--file", str(path))
    assert (done.returncode, done.stderr) == (0, "")
    assert "sha256" not in done.stdout
    assert HASH_A.removeprefix("sha256:") not in done.stdout
    assert tomllib.loads(done.stdout)["keys"] == [
        {"id": "svc-a", "permissions": ["tools.agenta.api.refine_prompt"]},
        {
            "id": "svc.b_2",
            "permissions": ["*"],
            "organization": "acme",
            "rate_limit": {"burst": 30, "per_minute": 90},
        },
    ]


def test_keys_list_reads_the_file_the_server_is_set_to(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_FILE)
    path.chmod(0o600)
    done = run_keys(tmp_path, "list", keys_file=path)
    assert done.returncode == 0
    assert [k["id"] for k in tomllib.loads(done.stdout)["keys"]] == ["svc-a", "svc.b_2"]


@pytest.mark.parametrize("command", [["list"], ["revoke", "svc-a"]])
def test_keys_list_and_revoke_need_a_file(tmp_path: Path, command: list[str]) -> None:
    done = run_keys(tmp_path, *command)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "pass --file or set AGENTA_AI_SERVICES_API_KEYS_FILE" in done.stderr


def test_keys_revoke_replaces_the_file_without_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, COMMENTED_FILE)
    path.chmod(0o400)
    inode = path.stat().st_ino

    done = run_keys(tmp_path, "revoke", "svc.b_2", keys_file=path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.count("\n") == 1
    assert '"svc.b_2"' in done.stdout

    # Renamed over the old file (a reader never sees half of it), with the same permissions.
    assert path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert [p.name for p in tmp_path.iterdir()] == ["keys.toml"]

    text = path.read_text()
    assert "# billing, owned by team A" in text
    assert "# aiservices keys" in text
    assert "team B" not in text
    store = KeyStore.from_file(path)
    assert store.ids() == ("svc-a", "svc-c")
    assert store.authenticate(KEY_B) is None
    assert store.authenticate(KEY_C) is not None


@pytest.mark.parametrize(
    ("keys_text", "key_id", "fragment"),
    [
        (COMMENTED_FILE, "svc-zz", 'no key "svc-zz"'),
        (entry(), "svc-a", "only key"),
        ("[[keys]]\nid = 1\n", "svc-a", "keys[0].id: must be a string"),
    ],
)
def test_keys_revoke_refuses_and_leaves_the_file_alone(
    tmp_path: Path, keys_text: str, key_id: str, fragment: str
) -> None:
    path = write(tmp_path, keys_text)
    path.chmod(0o600)
    before = (path.read_bytes(), path.stat().st_ino)
    done = run_keys(tmp_path, "revoke", key_id, "--file", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("aiservices-server keys revoke: ")
    assert fragment in done.stderr
    assert (path.read_bytes(), path.stat().st_ino) == before


# --- keys new --append, and editors that run at the same time ----------------------------------


def test_keys_new_append_creates_the_file_and_prints_only_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    first = run_keys(tmp_path, "new", "--id", "svc-a", "--permission", "*", "--append", str(path))
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip()
    assert first.stdout == key + "\n"  # `KEY=$(aiservices-server keys new ... --append F)`
    assert first.stderr == f'added "svc-a" to {path}: 1 key in it\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # as the server requires
    assert key not in path.read_text()

    second = run_keys(
        tmp_path, "new", "--id", "svc-b", "--permission", "edit_workflows", "--append", str(path)
    )
    assert second.returncode == 0, second.stderr
    store = KeyStore.from_file(path)
    assert store.ids() == ("svc-a", "svc-b")
    assert (store.authenticate(key) or pytest.fail("first key lost")).id == "svc-a"
    assert (store.authenticate(second.stdout.strip()) or pytest.fail("no key")).id == "svc-b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.toml"]  # no temp or lock file


def test_keys_new_append_keeps_comments_and_mode_and_refuses_a_taken_id(tmp_path: Path) -> None:
    path = write(tmp_path, COMMENTED_FILE.rstrip("\n"))  # no final newline either
    path.chmod(0o400)
    added = run_keys(tmp_path, "new", "--id", "svc-d", "--permission", "*", "--append", str(path))
    assert added.returncode == 0, added.stderr
    assert path.read_text().startswith(COMMENTED_FILE.rstrip("\n") + "\n\n[[keys]]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert KeyStore.from_file(path).ids() == ("svc-a", "svc.b_2", "svc-c", "svc-d")

    before = path.read_bytes()
    taken = run_keys(tmp_path, "new", "--id", "svc-c", "--permission", "*", "--append", str(path))
    assert (taken.returncode, taken.stdout) == (2, "")
    assert taken.stderr == (f'aiservices-server keys new: {path} already has a key "svc-c"\n')
    assert path.read_bytes() == before


def test_keys_new_warns_of_a_permission_no_tool_needs(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    typo = run_keys(
        tmp_path, "new", "--id", "svc", "--permission", "edit_workflow", "--append", str(path)
    )
    assert typo.returncode == 0  # it may name a tool this server does not serve yet
    warning = typo.stderr.splitlines()[-1]
    assert warning.startswith("aiservices-server keys new: warning: no tool this server serves")
    assert '"edit_workflow"' in warning and "edit_workflows" in warning
    known = ("edit_workflows", "*", "act_for_users")
    for permission in known:
        done = run_keys(tmp_path, "new", "--id", "x", "--permission", permission)
        assert (done.returncode, "warning" in done.stderr) == (0, False), done.stderr


def test_concurrent_editors_never_lose_an_edit(tmp_path: Path) -> None:
    """Real `keys` processes started together: six appends and two revokes of one file."""
    path = write(tmp_path, COMMENTED_FILE)
    path.chmod(0o600)
    prefix = [*SERVER_COMMAND, "keys"]
    commands = [
        [*prefix, "new", "--id", f"svc-new-{n}", "--permission", "*", "--append", str(path)]
        for n in range(6)
    ]
    commands += [[*prefix, "revoke", key_id, "--file", str(path)] for key_id in ("svc-a", "svc-c")]
    processes = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    errors = [process.communicate(timeout=60)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * len(commands), errors
    ids = KeyStore.from_file(path).ids()
    assert sorted(ids) == sorted(["svc.b_2", *(f"svc-new-{n}" for n in range(6))])


def test_a_dotted_key_of_too_many_parts_is_refused_before_toml_reads_it(tmp_path: Path) -> None:
    """tomllib keeps every prefix of a dotted key: a line of 100,000 parts cost it gigabytes,
    and the server was killed for its memory instead of printing one line."""
    text = "[[keys]]\n" + ".".join(["a"] * 100_000) + " = 1\n"
    assert load_error(tmp_path, text) == (
        "a dotted key of more than 64 parts (no keys file needs one)"
    )
