"""A real nginx for tests, running deploy/nginx.conf as an operator would, from a temp prefix.

The configuration is the committed file with only its `# EDIT` lines replaced (the replicas'
`server` lines, the `listen` lines, the access log: what its header says a deployment edits),
plus what an unprivileged nginx in a temp dir needs: `pid`, `error_log` (given with `-g`/`-e`)
and the `*_temp_path` directives. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.processes import REPO_ROOT
from tests.support.waiting import closed_port, wait_until

HOST = "127.0.0.1"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
GRPC_UPSTREAM = "aiservices_grpc"
MCP_UPSTREAM = "aiservices_mcp"
EDIT = "# EDIT"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
ADDRESS_IN_USE = "Address already in use"


def nginx_binary() -> str:
    """The nginx binary: on PATH, or Debian's /usr/sbin/nginx (which a user's PATH may leave
    out); a clear failure naming what installs it otherwise."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    if found is None:
        raise RuntimeError(
            "nginx is not installed: `make test` installs it (the Makefile's `redis` target, "
            "with apt, as root), or install it yourself (apt-get install nginx)"
        )
    return found


def render_conf(
    template: str,
    *,
    upstreams: Mapping[str, Sequence[str]],
    grpc_listen: str,
    mcp_listen: str,
    access_log: Path,
    temp_dir: Path,
) -> str:
    """`template` with every `# EDIT` line replaced and nothing else changed but the temp paths
    added at the top of `http`: the first `server` line of each upstream becomes one line per
    address in `upstreams[name]` (with the same parameters), the others go; the `listen` line
    with `http2` (gRPC) listens on `grpc_listen`, the other on `mcp_listen`. Raises ValueError
    when an `# EDIT` line is not one of those, or one of those is missing."""
    lines: list[str] = []
    upstream: str | None = None
    replaced: set[str] = set()
    for line in template.splitlines():
        stripped = line.split("#", 1)[0].strip()
        opened = re.fullmatch(r"upstream\s+(\S+)\s*\{", stripped)
        if opened:
            upstream = opened.group(1)
        elif stripped == "}":
            upstream = None
        indent = line[: len(line) - len(line.lstrip())]
        if stripped == "http {":
            lines.append(line)
            lines.extend(f"{indent}    {name}_temp_path {temp_dir / name};" for name in TEMP_PATHS)
            continue
        if not re.search(rf";\s*{EDIT}\s*$", line):  # a directive marked at its end
            lines.append(line)
            continue
        directive = stripped.split()[0] if stripped else ""
        if directive == "server" and upstream is not None and upstream in upstreams:
            if upstream not in replaced:
                replaced.add(upstream)
                parameters = re.fullmatch(r"server\s+\S+(.*);", stripped)
                if parameters is None:
                    raise ValueError(f"cannot read the server line {line!r}")
                lines.extend(
                    f"{indent}server {address}{parameters.group(1)};"
                    for address in upstreams[upstream]
                )
        elif directive == "listen":
            kind = "grpc_listen" if re.search(r"\bhttp2\b", stripped) else "mcp_listen"
            if kind in replaced:
                raise ValueError(f"a second {kind} line: {line!r}")
            replaced.add(kind)
            address = grpc_listen if kind == "grpc_listen" else mcp_listen
            lines.append(indent + re.sub(r"^listen\s+[^\s;]+", f"listen {address}", stripped))
        elif directive == "access_log":
            replaced.add("access_log")
            lines.append(
                indent + re.sub(r"^access_log\s+[^\s;]+", f"access_log {access_log}", stripped)
            )
        else:
            raise ValueError(f"an `{EDIT}` line the tests do not know how to edit: {line!r}")
    missing = {*upstreams, "grpc_listen", "mcp_listen", "access_log"} - replaced
    if missing:
        raise ValueError(f"{NGINX_CONF} has no `{EDIT}` line for {sorted(missing)}")
    return "\n".join(lines) + "\n"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class NginxProcess:
    """nginx in the foreground (`daemon off`) from its own temp prefix, in front of the given
    replicas' gRPC and MCP addresses. `start()` picks free loopback ports for the two listeners
    (trying again should another process take one first) and returns once both accept."""

    def __init__(
        self,
        grpc_servers: Sequence[str],
        mcp_servers: Sequence[str],
        *,
        startup_timeout: float = 15.0,
    ) -> None:
        self.binary = nginx_binary()
        self.upstreams = {GRPC_UPSTREAM: list(grpc_servers), MCP_UPSTREAM: list(mcp_servers)}
        self.startup_timeout = startup_timeout
        self.prefix = Path(tempfile.mkdtemp(prefix="aiservices-nginx-"))
        # Workers run as an unprivileged user when nginx starts as root: they must reach the
        # temp dirs the master makes for them in here.
        self.prefix.chmod(0o755)
        self.conf = self.prefix / "nginx.conf"
        self.access_log = self.prefix / "access.log"
        self.error_log = self.prefix / "error.log"
        self.stderr = self.prefix / "stderr.log"
        self.grpc_port = 0
        self.mcp_port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def mcp_url(self) -> str:
        return f"http://{HOST}:{self.mcp_port}/mcp"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The nginx master, once started."""
        if self._process is None:
            raise RuntimeError("nginx is not running")
        return self._process

    def start(self, attempts: int = 3) -> Self:
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except RuntimeError as exc:
                self.stop()
                if ADDRESS_IN_USE not in str(exc) or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.grpc_port, self.mcp_port = closed_port(), closed_port()
        while self.mcp_port == self.grpc_port:
            self.mcp_port = closed_port()
        self.conf.write_text(
            render_conf(
                NGINX_CONF.read_text(),
                upstreams=self.upstreams,
                grpc_listen=self.grpc_target,
                mcp_listen=f"{HOST}:{self.mcp_port}",
                access_log=self.access_log,
                temp_dir=self.prefix,
            )
        )
        self.error_log.write_bytes(b"")
        directives = (
            f"daemon off; pid {self.prefix / 'nginx.pid'}; error_log {self.error_log} warn;"
        )
        logs = ("-e", str(self.error_log))  # from the start, before the configuration is read
        with self.stderr.open("wb") as stderr:
            self._process = subprocess.Popen(
                [
                    self.binary,
                    "-p",
                    f"{self.prefix}/",
                    "-c",
                    str(self.conf),
                    *logs,
                    "-g",
                    directives,
                ],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its workers too: stop() can end the whole group
            )
        process = self._process
        up = wait_until(
            lambda: (
                process.poll() is not None or (_accepts(self.grpc_port) and _accepts(self.mcp_port))
            ),
            self.startup_timeout,
            interval=0.02,
        )
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{self.errors()}")
        if not up:
            raise RuntimeError(
                f"nginx did not listen within {self.startup_timeout:g} s:\n{self.errors()}"
            )

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), SIGKILL after 5 s."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5.0)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.prefix, ignore_errors=True)

    def errors(self) -> str:
        """What nginx said on stderr and in its error log (startup problems, upstream
        failures)."""
        parts = []
        for path in (self.stderr, self.error_log):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace").strip())
        return "\n".join(part for part in parts if part) or "(nothing logged)"

    def requests(self) -> list[dict[str, Any]]:
        """The access log: one JSON object per request (deploy/nginx.conf's `aiservices`
        format), in the order nginx finished them."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
