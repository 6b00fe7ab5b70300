"""Bad settings stop start-up with one line naming the setting and why (exit code 2), never a
traceback, a secret, or a server that starts and then fails every call; misspelled settings and
a keys file others may read or write do not go unnoticed.

Most cases call the start-up functions in-process (`load_settings`, the keys file loader,
`server_credentials`); a few run the real `aiservices-server` to prove the exit code and the
single line on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS

from aiservices_server.app import StartupError
from aiservices_server.auth import KeysFileError, load_keys_file
from aiservices_server.config import (
    ENV_PREFIX,
    Settings,
    SettingsError,
    check_http_url,
    load_settings,
    split_host_port,
    unknown_settings,
)
from aiservices_server.ratelimit import redis_url_problem
from aiservices_server.tls import server_credentials
from tests.support.certs import TestCertificates
from tests.support.keys import load_test_keys
from tests.support.processes import PROJECT_VERSION, ServerProcess, run_to_exit
from tests.support.servers import make_settings

SECRET = "s3cret-Pw"
"""Stands for a password or key inside a bad value: it must never reach a message."""


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Settings come only from what the test sets: no inherited variables, no `.env`."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def settings_error(environment: pytest.MonkeyPatch, **values: str) -> str:
    for name, value in values.items():
        environment.setenv(ENV_PREFIX + name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


# --- one line naming the setting ------------------------------------------------------------

BAD_VALUES = [
    # grpc keeps message limits in an int32: this used to crash in grpc with OverflowError.
    ("MAX_MESSAGE_BYTES", "2147483648"),
    # The Redis client used to raise on these at start-up, with a traceback.
    ("REDIS_URL", "redis://127.0.0.1:notaport"),
    ("REDIS_URL", "redis://127.0.0.1:99999"),
    ("REDIS_URL", "redis://127.0.0.1:0"),
    ("REDIS_URL", f"redis://:{SECRET}/x@127.0.0.1:6379"),  # an unencoded "/" in the password
    ("REDIS_URL", "redis://127.0.0.1:6379?db=first"),
    # Accepted, then every rate-limit decision failed over to memory.
    ("REDIS_URL", "redis://127.0.0.1:6379?no_such_option=1"),
    ("REDIS_URL", "unix://"),
    ("REDIS_URL", "http://127.0.0.1:6379"),
    # The upstream URL: a traceback from httpx, or a server that fails every call.
    ("API_URL", "http://[::1"),
    ("API_URL", "http://example.com:notaport"),
    ("API_URL", "http://example.com:99999"),
    ("API_URL", "http://example.com:0"),
    ("API_URL", "http://example.com:-1"),
    ("API_URL", "http://exa mple.com"),
    ("API_URL", "http://example.com/?stage=1"),
    ("API_URL", "http:///no-host"),
    ("API_URL", "ftp://example.com"),
    # Addresses the service listens on.
    ("GRPC_ADDRESS", "127.0.0.1:99999"),
    ("GRPC_ADDRESS", "[::1:50051"),
    ("GRPC_ADDRESS", "127.0.0.1:\u0663"),  # an Arabic-Indic digit
    ("GRPC_ADDRESS", "b\u00fccher.example:50051"),  # used to crash in socket with TypeError
    ("GRPC_ADDRESS", "127.0.0.1:50051 "),
    ("METRICS_ADDRESS", "127.0.0.1:99999"),
    ("METRICS_ADDRESS", "localhost"),
    # Numbers that are not numbers, and words that are no choice.
    ("UPSTREAM_TIMEOUT", "nan"),
    ("QUEUE_TIMEOUT", "nan"),
    ("SHUTDOWN_GRACE", "inf"),
    ("SHUTDOWN_GRACE", "-1"),
    ("REFLECTION", "maybe"),
    ("LOG_PAYLOADS", "2"),
    ("LOG_LEVEL", "verbose"),
    ("EVENT_LOOP", "trio"),
    ("AUTH", "none"),
    # It goes into an HTTP header: this failed every upstream call.
    ("API_KEY", f"{SECRET} with spaces"),
    ("API_KEY", f"{SECRET}\u00e9"),
]


@pytest.mark.parametrize(("setting", "bad"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_setting_without_secrets(
    environment: pytest.MonkeyPatch, setting: str, bad: str
) -> None:
    message = settings_error(environment, **{setting: bad})
    assert message.startswith(f"invalid setting {ENV_PREFIX}{setting}: "), message
    assert "\n" not in message
    assert SECRET not in message


def test_credentials_in_the_upstream_url_are_refused_pointing_at_the_key_setting(
    environment: pytest.MonkeyPatch,
) -> None:
    message = settings_error(environment, API_URL=f"https://agenta:{SECRET}@cloud.example")
    assert message.startswith(f"invalid setting {ENV_PREFIX}API_URL: ")
    assert f"{ENV_PREFIX}API_KEY" in message
    assert SECRET not in message
    assert "agenta" not in message.removeprefix(f"invalid setting {ENV_PREFIX}API_URL")


def test_the_metrics_address_must_differ_from_the_grpc_address(
    environment: pytest.MonkeyPatch,
) -> None:
    message = settings_error(
        environment, GRPC_ADDRESS="127.0.0.1:50999", METRICS_ADDRESS="127.0.0.1:50999"
    )
    assert f"{ENV_PREFIX}METRICS_ADDRESS must differ from {ENV_PREFIX}GRPC_ADDRESS" in message


def test_a_dot_env_file_that_is_not_utf8_is_one_line(environment: pytest.MonkeyPatch) -> None:
    Path(".env").write_bytes(f"{ENV_PREFIX}LOG_LEVEL=\xff\xfe\n".encode("latin-1"))
    with pytest.raises(SettingsError, match=r"^cannot read the \.env file: it is not UTF-8 text$"):
        load_settings()


def test_good_values_still_load(environment: pytest.MonkeyPatch) -> None:
    values = {
        "API_URL": " https://cloud.example:8443/api/ ",
        "API_KEY": " key.with-dots_123\n",
        "REDIS_URL": "rediss://:p%2Fw@redis.internal:6380/2?socket_timeout=0.5",
        "GRPC_ADDRESS": "[::1]:0",
        "METRICS_ADDRESS": "127.0.0.1:0",
        "MAX_MESSAGE_BYTES": str(2**31 - 1),
        "API_KEYS_FILE": " ",
    }
    for name, value in values.items():
        environment.setenv(ENV_PREFIX + name, value)
    loaded = load_settings()
    assert loaded.api_url == "https://cloud.example:8443/api"
    assert loaded.api_key is not None
    assert loaded.api_key.get_secret_value() == "key.with-dots_123"
    assert loaded.redis_url is not None
    assert split_host_port(loaded.grpc_address) == ("::1", 0)
    assert loaded.max_message_bytes == 2**31 - 1
    assert loaded.api_keys_file is None  # blank is unset, not the current directory


# --- Redis URL options ------------------------------------------------------------------------


def refused_redis_option(url: str) -> str:
    """The option a bad Redis URL's one line names, checked for one line without the password."""
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url=url)
    message = str(caught.value)
    prefix = f"invalid setting {ENV_PREFIX}REDIS_URL: option "
    assert message.startswith(prefix), message
    assert "\n" not in message
    assert SECRET not in message
    return message.removeprefix(prefix).split(" ", 1)[0]


@pytest.mark.parametrize(
    ("url", "option"),
    [
        # Tracebacks at start-up: redis's own ConnectionError and RedisError.
        (f"redis://:{SECRET}@127.0.0.1:6379/0?protocol=9", "protocol"),
        (f"rediss://:{SECRET}@127.0.0.1:6379/0?ssl_cert_reqs=bogus", "ssl_cert_reqs"),
        # Not an option of plain redis:// connections.
        (f"redis://:{SECRET}@127.0.0.1:6379/0?ssl_cert_reqs=required", "ssl_cert_reqs"),
        (f"unix://:{SECRET}@/run/redis/redis.sock?socket_keepalive=true", "socket_keepalive"),
        # Built, then refused only when the first connection made its TLS context.
        (f"rediss://:{SECRET}@127.0.0.1:6379/0?ssl_min_version=99", "ssl_min_version"),
        (f"rediss://:{SECRET}@127.0.0.1:6379/0?ssl_ca_certs=/nonexistent.pem", "ssl_ca_certs"),
        (f"rediss://:{SECRET}@127.0.0.1:6379/0?ssl_ciphers=NO-SUCH-CIPHER", "ssl_ciphers"),
        # Text where the client wants an object: an AttributeError.
        (f"redis://:{SECRET}@127.0.0.1:6379/0?retry=3", "retry"),
        (
            f"redis://:{SECRET}@127.0.0.1:6379/0?socket_timeout=1&max_connections=-1",
            "max_connections",
        ),
    ],
)
def test_a_redis_url_option_the_client_refuses_is_named_in_one_line(
    environment: pytest.MonkeyPatch, url: str, option: str
) -> None:
    assert refused_redis_option(url) == option


def test_redis_tls_options_that_only_work_together_load_and_a_bad_one_beside_them_is_named(
    environment: pytest.MonkeyPatch, certs: TestCertificates
) -> None:
    tls = (
        f"ssl_certfile={quote(str(certs.client.cert_file))}"
        f"&ssl_keyfile={quote(str(certs.client.key_file))}"
        f"&ssl_ca_certs={quote(str(certs.ca.cert_file))}"
    )
    url = f"rediss://:{SECRET}@redis.internal:6380/0?{tls}&protocol=3&ssl_cert_reqs=required"
    loaded = load_settings(redis_url=url)
    assert loaded.redis_url is not None
    assert loaded.redis_url.get_secret_value() == url
    # Only protocol is named: without it the rest builds. (A key file tried alone would not.)
    assert refused_redis_option(url.replace("protocol=3", "protocol=9")) == "protocol"


def test_an_option_the_redis_client_does_not_know_is_not_quoted(
    environment: pytest.MonkeyPatch,
) -> None:
    # The name may be the end of a password whose "?" was not percent-encoded.
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url=f"redis://127.0.0.1:6379/0?{SECRET}=1")
    assert str(caught.value) == (
        f"invalid setting {ENV_PREFIX}REDIS_URL: has an option the Redis client does not know "
        "(percent-encode ? in a password)"
    )


def test_checking_a_redis_url_connects_nowhere(environment: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        load_settings(redis_url=f"redis://:{SECRET}@127.0.0.1:{port}/0?socket_timeout=1")
        refused_redis_option(f"redis://:{SECRET}@127.0.0.1:{port}/0?protocol=9")
        # A connection, had one been made, would be complete and queued by now.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


# --- misspelled settings ---------------------------------------------------------------------


def test_unknown_prefixed_variables_are_named_with_the_closest_setting() -> None:
    environ = {
        f"{ENV_PREFIX}APIKEYS_FILE": SECRET,
        f"{ENV_PREFIX.lower()}redis_ulr": SECRET,
        f"{ENV_PREFIX}WHATEVER": SECRET,
        f"{ENV_PREFIX}LOG_LEVEL": "INFO",  # known, in any case
        f"{ENV_PREFIX.lower()}log_level": "INFO",
        "PATH": "/usr/bin",
    }
    assert unknown_settings(environ) == [
        (f"{ENV_PREFIX}APIKEYS_FILE", f"{ENV_PREFIX}API_KEYS_FILE"),
        (f"{ENV_PREFIX}WHATEVER", None),
        (f"{ENV_PREFIX.lower()}redis_ulr", f"{ENV_PREFIX}REDIS_URL"),
    ]


def test_every_setting_is_known() -> None:
    environ = {ENV_PREFIX + name.upper(): "x" for name in Settings.model_fields}
    assert unknown_settings(environ) == []


# --- the keys file: permissions, size, shape ---------------------------------------------


def keys_file(tmp_path: Path, mode: int, text: str | None = None) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(load_test_keys().path.read_text() if text is None else text)
    path.chmod(mode)
    return path


def permission_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "readable by group or others" in r.getMessage()]


def test_a_keys_file_only_its_owner_can_read_loads_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert load_keys_file(keys_file(tmp_path, 0o600))
    assert permission_warnings(caplog) == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_a_keys_file_others_can_read_loads_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    caplog.set_level(logging.WARNING)
    path = keys_file(tmp_path, mode)
    assert load_keys_file(path)
    [warning] = permission_warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert warning.__dict__["path"] == str(path)
    assert warning.__dict__["mode"] == f"{mode:04o}"


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602, 0o660], ids=oct)
def test_a_keys_file_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = keys_file(tmp_path, mode)
    with pytest.raises(KeysFileError) as caught:
        load_keys_file(path)
    assert str(caught.value) == (
        f"API keys file {path}: is writable by group or others (mode {mode:04o}), so they could "
        "add a key: run chmod go-w on it"
    )


def test_a_keys_file_over_one_mib_is_refused(tmp_path: Path) -> None:
    text = load_test_keys().path.read_text() + "#" * (1024 * 1024)
    with pytest.raises(KeysFileError, match=r": too large \(over 1 MiB\)$"):
        load_keys_file(keys_file(tmp_path, 0o600, text))


def test_a_keys_file_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    text = "keys = " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(KeysFileError, match=r": not valid TOML \(nested too deeply\)$"):
        load_keys_file(keys_file(tmp_path, 0o600, text))


@pytest.mark.timeout(10)
def test_a_fifo_in_place_of_the_keys_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "keys.toml"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeysFileError, match=r": cannot read it \(not a regular file\)$"):
        load_keys_file(fifo)


# --- TLS files -------------------------------------------------------------------------------


def tls_error(
    tls_cert_file: Path, tls_key_file: Path, tls_client_ca_file: Path | None = None
) -> str:
    settings = make_settings(
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        tls_client_ca_file=tls_client_ca_file,
    )
    with pytest.raises(StartupError) as caught:
        server_credentials(settings)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_certificate_file_without_a_certificate_names_the_setting(
    certs: TestCertificates, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    message = tls_error(tls_cert_file=junk, tls_key_file=certs.server.key_file)
    assert message == f"{ENV_PREFIX}TLS_CERT_FILE {junk}: no PEM certificate in it"


def test_swapped_certificate_and_key_name_the_setting(certs: TestCertificates) -> None:
    message = tls_error(tls_cert_file=certs.server.key_file, tls_key_file=certs.server.cert_file)
    assert message.startswith(f"{ENV_PREFIX}TLS_CERT_FILE {certs.server.key_file}: no PEM")


def test_a_key_of_another_certificate_is_refused(certs: TestCertificates) -> None:
    message = tls_error(tls_cert_file=certs.server.cert_file, tls_key_file=certs.client.key_file)
    assert message.startswith(f"{ENV_PREFIX}TLS_KEY_FILE is not the unencrypted private key of")


def test_a_client_ca_file_without_certificates_names_the_setting(
    certs: TestCertificates,
) -> None:
    message = tls_error(
        tls_cert_file=certs.server.cert_file,
        tls_key_file=certs.server.key_file,
        tls_client_ca_file=certs.client.key_file,
    )
    assert message.startswith(f"{ENV_PREFIX}TLS_CLIENT_CA_FILE {certs.client.key_file}: no PEM")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("path", ["/dev/zero", "directory"])
def test_a_certificate_path_that_is_no_file_names_the_setting(
    certs: TestCertificates, tmp_path: Path, path: str
) -> None:
    where = tmp_path if path == "directory" else Path(path)
    message = tls_error(tls_cert_file=where, tls_key_file=certs.server.key_file)
    assert message.startswith(f"{ENV_PREFIX}TLS_CERT_FILE {where}: ")


def test_a_certificate_file_over_one_mib_is_refused(
    certs: TestCertificates, tmp_path: Path
) -> None:
    big = tmp_path / "big.crt"
    big.write_bytes(certs.server.cert_pem + b"#" * (1024 * 1024))
    message = tls_error(tls_cert_file=big, tls_key_file=certs.server.key_file)
    assert message == f"{ENV_PREFIX}TLS_CERT_FILE {big}: too large (over 1 MiB)"


def test_good_tls_files_still_make_credentials(certs: TestCertificates) -> None:
    credentials = server_credentials(
        make_settings(
            tls_cert_file=certs.server.cert_file,
            tls_key_file=certs.server.key_file,
            tls_client_ca_file=certs.ca.cert_file,
        )
    )
    assert credentials is not None


# --- the real entry point: exit code 2 and one line ----------------------------------------


@pytest.mark.parametrize(
    ("setting", "bad"),
    [
        ("MAX_MESSAGE_BYTES", "2147483648"),
        ("REDIS_URL", "redis://127.0.0.1:notaport"),
        ("REDIS_URL", f"redis://:{SECRET}/x@127.0.0.1:6379"),
        ("API_URL", "http://[::1"),
        ("API_URL", f"http://agenta:{SECRET}@127.0.0.1:8000"),
        ("GRPC_ADDRESS", "127.0.0.1:99999"),
    ],
)
def test_python_m_server_exits_2_with_one_line_naming_the_setting(
    tmp_path: Path, setting: str, bad: str
) -> None:
    keys = keys_file(tmp_path, 0o600)
    result = run_to_exit(
        tmp_path, {"GRPC_ADDRESS": "127.0.0.1:0", "API_KEYS_FILE": str(keys), setting: bad}
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"aiservices: invalid setting {ENV_PREFIX}{setting}: ")
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    ("url", "option"),
    [
        (f"redis://:{SECRET}@127.0.0.1:6379/0?ssl_cert_reqs=bogus", "ssl_cert_reqs"),
        (f"rediss://:{SECRET}@127.0.0.1:6379/0?ssl_cert_reqs=bogus", "ssl_cert_reqs"),
        (f"redis://:{SECRET}@127.0.0.1:6379/0?protocol=9", "protocol"),
    ],
)
def test_python_m_server_names_a_redis_url_option_the_client_refuses_in_one_line(
    tmp_path: Path, url: str, option: str
) -> None:
    """The rediss:// and protocol ones printed a traceback of 30-odd lines from inside the Redis
    client; the redis:// one was one line, naming no option."""
    keys = keys_file(tmp_path, 0o600)
    settings = {"GRPC_ADDRESS": "127.0.0.1:0", "API_KEYS_FILE": str(keys), "REDIS_URL": url}
    result = run_to_exit(tmp_path, settings)
    scheme = url.partition(":")[0]
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"aiservices: invalid setting {ENV_PREFIX}REDIS_URL: option {option} is refused by the "
        f"Redis client: check its value, and that it applies to {scheme}:// URLs\n"
    )


@pytest.mark.parametrize("mode", [0o666, 0o620], ids=oct)
def test_python_m_server_refuses_a_keys_file_others_can_write(tmp_path: Path, mode: int) -> None:
    keys = keys_file(tmp_path, mode)
    result = run_to_exit(tmp_path, {"GRPC_ADDRESS": "127.0.0.1:0", "API_KEYS_FILE": str(keys)})
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"aiservices: API keys file {keys}: is writable by group or others (mode {mode:04o}), "
        "so they could add a key: run chmod go-w on it\n"
    )


def test_python_m_server_refuses_a_certificate_grpc_cannot_use_in_one_line(
    certs: TestCertificates, tmp_path: Path
) -> None:
    keys = keys_file(tmp_path, 0o600)
    settings = {
        "API_KEYS_FILE": str(keys),
        "TLS_CERT_FILE": str(certs.server.cert_file),
        "TLS_KEY_FILE": str(certs.client.key_file),
    }
    result = run_to_exit(tmp_path, {"GRPC_ADDRESS": "127.0.0.1:0", **settings})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # none of grpc's own lines
    assert f"{ENV_PREFIX}TLS_KEY_FILE" in result.stderr


@pytest.fixture
def warned_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server started with a misspelled setting and a keys file everyone may read."""
    env = {
        "API_KEYS_FILE": str(keys_file(tmp_path, 0o644)),
        f"{ENV_PREFIX}REDIS_ULR": f"redis://:{SECRET}@127.0.0.1:6379",
    }
    with ServerProcess(env) as process:
        yield process


def test_a_misspelled_setting_is_named_in_a_warning_without_its_value(
    warned_server: ServerProcess,
) -> None:
    [warning] = [r for r in warned_server.records if r["msg"] == "unknown setting ignored"]
    assert warning["level"] == "WARNING"
    assert warning["setting"] == f"{ENV_PREFIX}REDIS_ULR"
    assert warning["did_you_mean"] == f"{ENV_PREFIX}REDIS_URL"
    assert all(SECRET not in line for line in warned_server.lines)


def test_a_keys_file_others_can_read_is_warned_about_at_start_up(
    warned_server: ServerProcess,
) -> None:
    [warning] = [r for r in warned_server.records if "readable by group or others" in r["msg"]]
    assert warning["level"] == "WARNING"
    assert warning["mode"] == "0644"


# --- parsers of settings text, on any text ---------------------------------------------------

# A few worst cases: long runs of the separators, digits past any port, broken brackets.
PARSER_CORPUS = [
    "",
    ":",
    "[" * 10_000 + ":1",
    ":" * 10_000,
    "1:" + "9" * 10_000,
    "a" * 100_000 + ":50051",
    "http://[::1",
    "redis://127.0.0.1:notaport",
    "http://" + "@" * 10_000,
    "redis://" + "[" * 10_000,
]


def with_corpus(test: Callable[[str], None]) -> Callable[[str], None]:
    """The corpus as explicit examples, tried on every run before the generated ones."""
    for value in PARSER_CORPUS:
        test = example(value)(test)
    return test


@settings(deadline=timedelta(milliseconds=250), max_examples=300)
@given(st.text())
@with_corpus
def test_split_host_port_raises_only_value_error(text: str) -> None:
    try:
        host, port = split_host_port(text)
    except ValueError:
        return
    assert 0 <= port <= 65535
    assert host.isascii() and host.isprintable() and host


URL_TEXT = st.text() | st.builds(
    str.__add__,
    st.sampled_from(["http://", "https://", "redis://", "rediss://", "unix://"]),
    st.text(),
)


@settings(deadline=timedelta(milliseconds=250), max_examples=300)
@given(URL_TEXT)
@with_corpus
def test_url_checks_raise_only_value_error_or_name_a_problem(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert check_http_url(text) == text
    problem = redis_url_problem(text)
    assert problem is None or isinstance(problem, str)


@settings(deadline=timedelta(milliseconds=250), max_examples=200)
@given(st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), min_size=8))
@example(f"{SECRET}/x")
@example(f"{SECRET}:99999")
@example(f"{SECRET}#frag")
def test_a_password_in_a_redis_url_is_never_in_the_problem(password: str) -> None:
    problem = redis_url_problem(f"redis://:{password}@127.0.0.1:6379/0")
    assert problem is None or password not in problem


# Every option the Redis client's URL parser converts, and keywords its connections take as text
# (the ssl_* ones only with rediss://) or would take only as an object.
REDIS_URL_OPTIONS = sorted(
    {
        *URL_QUERY_ARGUMENT_PARSERS,
        *("ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data"),
        *("ssl_ca_path", "ssl_ciphers", "ssl_password", "client_name", "username", "password"),
        *("encoding", "encoding_errors", "decode_responses", "lib_name", "lib_version", "path"),
        *("host", "port", "retry", "credential_provider", "parser_class", "encoder_class"),
        *("driver_info", "maint_notifications_config", "connection_class", "socket_type"),
    }
)
REDIS_URL_BASES = [
    f"redis://:{SECRET}@127.0.0.1:6379/0",
    f"rediss://:{SECRET}@127.0.0.1:6380/0",
    f"unix://:{SECRET}@/run/redis/redis.sock",
]
REDIS_OPTION_VALUES = [
    *("bogus", "9", "-1", "0", "1", "nan", "inf", "1e400", "9" * 30, "none", "required", "[]"),
    *("[,]", "VERIFY_X509_STRICT", "ConnectionError", "/nonexistent", "\x00", "\u00e9", SECRET),
]
REDIS_OPTION = st.tuples(
    st.sampled_from(REDIS_URL_OPTIONS) | st.text(max_size=20),
    st.sampled_from(REDIS_OPTION_VALUES) | st.text(max_size=20),
)


@settings(
    deadline=timedelta(milliseconds=250),
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the environment is not changed
)
@given(st.sampled_from(REDIS_URL_BASES), st.lists(REDIS_OPTION, max_size=4))
@example(REDIS_URL_BASES[1], [("ssl_cert_reqs", "bogus")])
@example(REDIS_URL_BASES[0], [("protocol", "9")])
@example(REDIS_URL_BASES[1], [("ssl_password", SECRET), ("ssl_min_version", "1e400")])
@pytest.mark.filterwarnings("ignore:.*lib_(name|version):DeprecationWarning")  # redis's own
def test_any_redis_url_option_loads_or_is_one_line_without_the_password(
    environment: pytest.MonkeyPatch, base: str, options: list[tuple[str, str]]
) -> None:
    query = "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in options)
    try:
        loaded = load_settings(redis_url=f"{base}?{query}")
    except SettingsError as exc:
        message = str(exc)
        assert message.startswith(f"invalid setting {ENV_PREFIX}REDIS_URL: "), message
        assert "\n" not in message
        assert SECRET not in message
    else:
        assert loaded.redis_url is not None


# --- the MCP listener ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"MCP_ADDRESS": "0.0.0.0:8931"}, "MCP_ADDRESS"),
        ({"MCP_ADDRESS": "127.0.0.1:50071", "GRPC_ADDRESS": "127.0.0.1:50071"}, "MCP_ADDRESS"),
        ({"MCP_ADDRESS": "127.0.0.1:9471", "METRICS_ADDRESS": "127.0.0.1:9471"}, "MCP_ADDRESS"),
    ],
    ids=["not loopback without TLS", "the gRPC address", "the metrics address"],
)
def test_an_mcp_address_that_cannot_be_served_stops_start_up_with_one_line(
    tmp_path: Path, values: dict[str, str], named: str
) -> None:
    settings = {"API_KEYS_FILE": str(load_test_keys().path), "GRPC_ADDRESS": "127.0.0.1:0"}
    result = run_to_exit(tmp_path, {**settings, **values})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert ENV_PREFIX + named in lines[0]


def test_a_non_loopback_mcp_address_is_accepted_with_tls_or_allow_plaintext(
    environment: pytest.MonkeyPatch, certs: TestCertificates
) -> None:
    environment.setenv(ENV_PREFIX + "MCP_ADDRESS", "0.0.0.0:8931")
    environment.setenv(ENV_PREFIX + "MCP_ALLOW_PLAINTEXT", "true")
    environment.setenv(ENV_PREFIX + "MCP_ALLOWED_HOSTS", "mcp.internal.example")
    assert load_settings().mcp_host_port == ("0.0.0.0", 8931)
    environment.delenv(ENV_PREFIX + "MCP_ALLOW_PLAINTEXT")
    environment.setenv(ENV_PREFIX + "TLS_CERT_FILE", str(certs.server.cert_file))
    environment.setenv(ENV_PREFIX + "TLS_KEY_FILE", str(certs.server.key_file))
    assert load_settings().mcp_host_port == ("0.0.0.0", 8931)


def test_mcp_on_every_address_needs_the_hosts_clients_reach_it_by(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv(ENV_PREFIX + "MCP_ADDRESS", "0.0.0.0:8931")
    environment.setenv(ENV_PREFIX + "MCP_ALLOW_PLAINTEXT", "true")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value) == (
        f"invalid settings: {ENV_PREFIX}MCP_ADDRESS 0.0.0.0:8931 listens on every address: set "
        f"{ENV_PREFIX}MCP_ALLOWED_HOSTS to the names clients reach it by (or * to accept any Host)"
    )
    environment.setenv(ENV_PREFIX + "MCP_ALLOWED_HOSTS", "mcp.example.com:443, 10.0.0.5")
    assert load_settings().mcp_allowed_hosts == ("mcp.example.com:443", "10.0.0.5")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("MCP_ALLOWED_HOSTS", "evil.example/path"),
        ("MCP_ALLOWED_HOSTS", "host:port"),
        ("MCP_ALLOWED_HOSTS", "[::1"),
        ("MCP_ALLOWED_ORIGINS", "app.example.com"),
        ("MCP_ALLOWED_ORIGINS", "https://app.example.com/"),
        ("MCP_ALLOWED_ORIGINS", "ftp://app.example.com"),
        ("MCP_HEADER_TIMEOUT", "0"),
        ("MCP_IDLE_TIMEOUT", "0.5"),
        ("MCP_MAX_CONNECTIONS", "0"),
        ("GRPC_MAX_CONNECTIONS", "-1"),
        ("GRPC_MAX_CONNECTION_AGE", "nan"),
    ],
)
def test_bad_listener_settings_are_one_line_naming_the_setting(
    environment: pytest.MonkeyPatch, setting: str, value: str
) -> None:
    environment.setenv(ENV_PREFIX + setting, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"invalid setting {ENV_PREFIX}{setting}: ")
    assert "\n" not in str(refused.value)


# --- the command line ----------------------------------------------------------------------------


def test_help_and_version_answer_without_settings(tmp_path: Path) -> None:
    helped = run_to_exit(tmp_path, {}, "--help")
    assert helped.returncode == 0
    assert "aiservices-server config" in helped.stdout and "keys" in helped.stdout
    versioned = run_to_exit(tmp_path, {}, "--version")
    assert (versioned.returncode, versioned.stdout.strip()) == (
        0,
        f"aiservices-server {PROJECT_VERSION}",
    )
    unknown = run_to_exit(tmp_path, {}, "--nope")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().endswith("unknown argument '--nope'")
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_config_prints_every_setting_with_its_secrets_redacted(tmp_path: Path) -> None:
    secrets = {
        "API_KEY": "agenta-secret-4f1e",
        "OPENAI_API_KEY": "openai-secret-77aa",
        "REDIS_URL": "redis://:redis-secret-09bc@127.0.0.1:6379/0",
    }
    ran = run_to_exit(
        tmp_path, {**secrets, "UPSTREAM": "openai", "GRPC_ADDRESS": "127.0.0.1:7"}, "config"
    )
    assert ran.returncode == 0, ran.stderr
    lines = dict(line.split("=", 1) for line in ran.stdout.splitlines())
    assert lines[f"{ENV_PREFIX}UPSTREAM"] == "openai"
    assert lines[f"{ENV_PREFIX}GRPC_ADDRESS"] == "127.0.0.1:7"
    assert lines[f"{ENV_PREFIX}RATE_LIMIT_BURST"] == "10"
    for name in secrets:
        assert lines[f"{ENV_PREFIX}{name}"] == "**********"
    assert not any(value in ran.stdout for value in ("4f1e", "77aa", "09bc"))
    broken = run_to_exit(tmp_path, {"UPSTREAM": "nope"}, "config")
    assert broken.returncode == 2
    assert broken.stderr.startswith("aiservices: invalid setting AGENTA_AI_SERVICES_UPSTREAM")
