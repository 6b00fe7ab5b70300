"""The deployment files in deploy/ agree with the code, so they cannot drift from it.

Read with real parsers (YAML, TOML, the Dockerfile's own line rules), without docker or a
cluster: every `AGENTA_AI_SERVICES_*` name they set is a setting, and the values pass the
server's own checks; the ports they open are the ports the addresses name; the probes ask for
the health names the server registers; the grace periods outlast SHUTDOWN_GRACE; the image's
entry point is the console script pyproject declares, and it runs as an unprivileged user; the
keys file is mounted read-only as a directory (so a changed file reaches the running server);
secrets come from Secrets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from aiservices_server.app import SERVICE_NAME
from aiservices_server.config import ENV_PREFIX, AuthMode, Settings, split_host_port
from tests.support.processes import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# grpc.health.v1's name for the server as a whole; the server registers it beside SERVICE_NAME.
WHOLE_SERVER = ""
# The settings that name a listener's address, each with the port it opens.
ADDRESSES = ("GRPC_ADDRESS", "MCP_ADDRESS", "METRICS_ADDRESS")
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)
SECRET_SETTINGS = frozenset(
    name.upper() for name, info in Settings.model_fields.items() if "SecretStr" in str(info)
)


def test_the_secret_settings_are_found() -> None:
    assert {"API_KEY", "OPENAI_API_KEY", "REDIS_URL"} <= SECRET_SETTINGS
    assert isinstance(Settings.model_validate({"api_key": "x"}).api_key, SecretStr)


def unknown_names(env: Mapping[str, object]) -> list[str]:
    """The `AGENTA_AI_SERVICES_*` names in `env` that name no setting."""
    return sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX) not in SETTING_NAMES
    )


def validated(env: Mapping[str, str]) -> Settings:
    """The settings `env` makes, through the server's own checks (no .env, no environment)."""
    values = {
        name.removeprefix(ENV_PREFIX).lower(): value
        for name, value in env.items()
        if name.startswith(ENV_PREFIX)
    }
    return Settings.model_validate(values)


def port_of(address: str) -> int:
    return split_host_port(address)[1]


def listener_ports(settings: Settings) -> set[int]:
    addresses = (settings.grpc_address, settings.mcp_address, settings.metrics_address)
    return {port_of(address) for address in addresses if address is not None}


def seconds(duration: str) -> float:
    """A compose duration such as `15s` or `1m30s`."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts is not None and duration, f"not a duration: {duration!r}"
    hours, minutes, secs = (float(part) if part else 0.0 for part in parts.groups())
    return hours * 3600 + minutes * 60 + secs


# The Dockerfile.


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions (continuations joined, comments
    dropped, as Docker reads them)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append(pending + line.strip())
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        else:
            assert stages, "an instruction before the first FROM"
            stages[-1].instructions.append((instruction.upper(), args.strip()))
    return stages


def env_instructions(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            name, equals, value = word.partition("=")
            assert equals, f"ENV {args}: use the NAME=value form"
            env[name] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages((DEPLOY / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    """The image's stage: the last one, which `docker build` makes without --target."""
    return stages[-1]


def image_user(runtime: Stage) -> int:
    users = runtime.all("USER")
    assert users, "the runtime stage sets no USER: it would run as root"
    user = users[-1].partition(":")[0]
    assert user.isdigit(), f"USER {users[-1]}: numeric, so runAsNonRoot can check it"
    return int(user)


def test_the_image_builds_the_wheels_as_make_dist_does(stages: list[Stage]) -> None:
    build = stages[0]
    commands = " ".join(build.all("RUN"))
    assert re.search(r"\bmake dist\b", commands), "the build stage must run `make dist`"
    copied = " ".join(build.all("COPY"))
    for needed in ("Makefile", "pyproject.toml", "uv.lock", "clients/", "server/"):
        assert needed in copied.split(), f"the build stage does not copy {needed}"


def test_the_runtime_stage_installs_only_the_wheels(stages: list[Stage], runtime: Stage) -> None:
    assert runtime.base.startswith("python:3.11") and "slim" in runtime.base, runtime.base
    commands = " ".join(runtime.all("RUN"))
    # What `make dist` wrote in the build stage, mounted for the install only.
    dist = re.search(r"\bmake dist DIST=(\S+)", " ".join(stages[0].all("RUN")))
    mount = re.search(r"--mount=type=bind,from=(\S+),source=(\S+),target=(\S+)", commands)
    assert dist is not None and mount is not None
    assert mount.group(1) == stages[0].name and mount.group(2) == dist.group(1)
    assert "apt-get" not in commands, "no system packages (compilers, tools) in the runtime image"
    installs = re.findall(r"pip install ([^&]+)", commands)
    assert len(installs) == 1, installs
    words = shlex.split(installs[0])
    assert "--only-binary=:all:" in words, "the runtime stage must not compile anything"
    assert words[words.index("-c") + 1] == f"{mount.group(3)}/constraints.txt"
    packages = [word for word in words[words.index("-c") + 2 :] if not word.startswith("-")]
    assert packages[0] == f"{mount.group(3)}/aiservices_client-*.whl", packages
    assert len(packages) == 2, packages
    assert not runtime.all("COPY"), "the wheels come in through a mount, not a layer"


def test_the_image_installs_the_server_with_its_otel_extra_unless_the_build_says_not(
    runtime: Stage, tmp_path: Path
) -> None:
    """The server wheel's word of the runtime stage's `pip install`, expanded by a POSIX shell
    over a directory holding the two wheels, as the build would."""
    (argument,) = [args for args in runtime.all("ARG") if args.startswith("SERVER_EXTRAS=")]
    default = argument.partition("=")[2]
    assert default == "otel"
    assert (
        "otel"
        in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
    )
    commands = " ".join(runtime.all("RUN"))
    mount = re.search(r"target=(\S+)", commands)
    (install,) = re.findall(r"pip install ([^&]+)", commands)
    (word,) = [w for w in shlex.split(install) if "aiservices_server-" in w]
    assert mount is not None
    dist = tmp_path / "dist"
    dist.mkdir()
    for name in (
        "aiservices_client-1.0-py3-none-any.whl",
        "aiservices_server-1.0-py3-none-any.whl",
    ):
        (dist / name).touch()
    script = 'printf "%s" "' + word.replace(mount.group(1), str(dist)) + '"'
    server = f"{dist}/aiservices_server-1.0-py3-none-any.whl"
    for extras, expected in ((default, f"{server}[otel]"), ("", server)):
        shown = subprocess.run(
            ["sh", "-c", script],
            env={"PATH": os.environ["PATH"], "SERVER_EXTRAS": extras},
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout == expected


def test_the_entry_point_is_the_declared_console_script(runtime: Stage) -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = runtime.all("ENTRYPOINT")
    assert len(entrypoints) == 1
    entrypoint = json.loads(entrypoints[0])
    assert entrypoint == ["aiservices-server"], entrypoint
    assert entrypoint[0] in scripts
    assert not runtime.all("CMD")


def test_the_image_runs_as_an_unprivileged_user(runtime: Stage) -> None:
    assert image_user(runtime) >= 1000


def test_the_image_environment_is_settings_and_its_ports_are_exposed(runtime: Stage) -> None:
    env = env_instructions(runtime)
    assert not unknown_names(env)
    settings = validated(env)
    assert split_host_port(settings.grpc_address)[0] == "0.0.0.0"
    exposed = {int(port) for args in runtime.all("EXPOSE") for port in args.split()}
    # The image's own address, and the ones the deployments below set.
    assert port_of(settings.grpc_address) in exposed
    for deployed in deployment_environments():
        assert listener_ports(validated(deployed)) <= exposed


# Compose.


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def replicas() -> dict[str, dict[str, Any]]:
    """The services that run the server: those with a gRPC address."""
    return {
        name: service
        for name, service in services().items()
        if f"{ENV_PREFIX}GRPC_ADDRESS" in service.get("environment", {})
    }


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {name: str(value) for name, value in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    found = []
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        found.append(Mount(source, target, "ro" in options))
    return found


def test_compose_runs_two_replicas_or_more() -> None:
    assert len(replicas()) >= 2


def test_compose_sets_only_settings() -> None:
    for name, service in services().items():
        assert not unknown_names(environment(service)), name


def test_compose_replicas_pass_the_settings_checks() -> None:
    for name, service in replicas().items():
        settings = validated(environment(service))
        assert settings.auth is AuthMode.KEYS, name
        assert settings.upstream_enabled, name
        for address in (settings.grpc_address, settings.mcp_address, settings.metrics_address):
            assert address is not None and address.startswith("0.0.0.0:"), (name, address)
        assert settings.grpc_max_connection_age > 0, name


def test_compose_replicas_run_the_image_entry_point() -> None:
    for name, service in replicas().items():
        assert "entrypoint" not in service and "command" not in service, name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"]).resolve() == REPO_ROOT


def test_compose_mounts_the_keys_directory_read_only(runtime: Stage) -> None:
    keys = services()["keys"]
    assert keys["entrypoint"] == ["aiservices-server", "keys"]
    keys_file = environment(keys)[f"{ENV_PREFIX}API_KEYS_FILE"]
    keys_dir = str(PurePosixPath(keys_file).parent)
    # The image makes the directory, so the volume takes the service user's ownership from it.
    assert keys_dir in " ".join(runtime.all("RUN"))
    (volume,) = [mount for mount in mounts(keys) if mount.target == keys_dir]
    assert not volume.read_only
    for name, service in replicas().items():
        assert str(validated(environment(service)).api_keys_file) == keys_file, name
        # The directory, not the file: keys commands rename a new file into it, which a mount
        # of the file itself would never show.
        (mount,) = [mount for mount in mounts(service) if mount.target == keys_dir]
        assert mount.read_only, name
        assert mount.source == volume.source and mount.source in compose()["volumes"], name


def test_compose_health_check_asks_the_tool_service_on_the_grpc_port() -> None:
    for name, service in replicas().items():
        settings = validated(environment(service))
        check = " ".join(service["healthcheck"]["test"])
        assert f"service='{SERVICE_NAME}'" in check, name
        assert f"'127.0.0.1:{port_of(settings.grpc_address)}'" in check, name


def test_compose_stop_grace_outlasts_shutdown_grace() -> None:
    for name, service in replicas().items():
        settings = validated(environment(service))
        assert seconds(service["stop_grace_period"]) > settings.shutdown_grace, name


def test_compose_gives_each_replica_a_standin_it_can_reach() -> None:
    """The stand-in serves loopback only, so each replica's runs in its network namespace."""
    standins = {
        service["network_mode"].removeprefix("service:"): service
        for service in services().values()
        if service.get("entrypoint", [])[:3] == ["python", "-m", "tests.standin"]
    }
    assert set(standins) == set(replicas())
    for name, replica in replicas().items():
        settings = validated(environment(replica))
        standin = standins[name]
        arguments = standin["entrypoint"][3:]
        assert settings.api_url == f"http://127.0.0.1:{arguments[arguments.index('--port') + 1]}"
        assert settings.api_key is not None
        assert arguments[arguments.index("--api-key") + 1] == settings.api_key.get_secret_value()
        (tests,) = [mount for mount in mounts(standin) if mount.target.endswith("/tests")]
        assert tests.read_only
        assert (DEPLOY / tests.source / "standin" / "__main__.py").is_file()
        assert PurePosixPath(standin["working_dir"]) == PurePosixPath(tests.target).parent


def test_compose_redis_is_a_service() -> None:
    for service in replicas().values():
        url = validated(environment(service)).redis_url
        assert url is not None
        host = url.get_secret_value().removeprefix("redis://").partition(":")[0]
        assert host in services()


def nginx_listen_ports(text: str) -> set[int]:
    ports = set()
    for listen in re.findall(r"^\s*listen\s+([^;\s]+)", text, re.MULTILINE):
        port = listen.rpartition(":")[2]
        if port.isdigit():
            ports.add(int(port))
    return ports


def test_compose_nginx_uses_deploy_nginx_conf() -> None:
    nginx = services()["nginx"]
    (conf,) = [mount for mount in mounts(nginx) if mount.source.endswith("nginx.conf")]
    path = DEPLOY / conf.source
    assert path.resolve() == DEPLOY / "nginx.conf"
    assert conf.read_only
    assert path.is_file(), "deploy/nginx.conf is missing"
    text = path.read_text()
    whole = re.search(r"^\s*http\s*\{", text, re.MULTILINE) is not None
    assert conf.target == "/etc/nginx/nginx.conf" if whole else conf.target.endswith(".conf")
    published = {int(str(port).rpartition(":")[2]) for port in nginx["ports"]}
    assert published == nginx_listen_ports(text)
    assert set(nginx["depends_on"]) == set(replicas())


# Kubernetes.


def kubernetes_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in kubernetes_documents() if doc.get("kind") == kind]


def deployment() -> dict[str, Any]:
    (found,) = of_kind("Deployment")
    return found


def container() -> dict[str, Any]:
    (found,) = deployment()["spec"]["template"]["spec"]["containers"]
    assert isinstance(found, dict)
    return found


def container_env() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container()["env"]}


def placeholder(name: str) -> str:
    """A value for a setting the Deployment takes from a Secret."""
    return "redis://redis.invalid:6379/0" if name.endswith("REDIS_URL") else "from-a-secret"


def deployment_settings() -> dict[str, str]:
    return {
        name: str(item["value"]) if "value" in item else placeholder(name)
        for name, item in container_env().items()
    }


def deployment_environments() -> Iterator[dict[str, str]]:
    yield deployment_settings()
    for service in replicas().values():
        yield environment(service)


def test_the_kustomization_lists_every_manifest() -> None:
    (kustomization,) = of_kind("Kustomization")
    manifests = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_the_deployment_sets_only_settings() -> None:
    assert not unknown_names(container_env())


def test_the_deployment_passes_the_settings_checks() -> None:
    settings = validated(deployment_settings())
    assert settings.auth is AuthMode.KEYS
    assert settings.upstream_enabled
    assert settings.grpc_max_connection_age > 0
    assert f"{ENV_PREFIX}GRPC_MAX_CONNECTION_AGE_GRACE" in container_env()


def test_the_deployment_takes_secrets_from_secrets() -> None:
    for name, item in container_env().items():
        if name.removeprefix(ENV_PREFIX) in SECRET_SETTINGS:
            assert "secretKeyRef" in item.get("valueFrom", {}), f"{name} in plain text"
    assert f"{ENV_PREFIX}REDIS_URL" in container_env()


def test_the_deployment_opens_the_ports_its_addresses_name() -> None:
    settings = validated(deployment_settings())
    ports = {port["containerPort"] for port in container()["ports"]}
    assert ports == listener_ports(settings)


def test_the_probes_ask_for_the_health_names_the_server_registers() -> None:
    grpc_port = port_of(validated(deployment_settings()).grpc_address)
    probes = {kind: container()[kind]["grpc"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"].get("service", "") == WHOLE_SERVER
    startup = container().get("startupProbe")
    if startup is not None:
        probes["startupProbe"] = startup["grpc"]
    for probe in probes.values():
        assert probe["port"] == grpc_port


def test_the_pod_outlasts_the_drain() -> None:
    settings = validated(deployment_settings())
    pause = 0.0
    pre_stop = container().get("lifecycle", {}).get("preStop")
    if pre_stop is not None:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        pause = float(command[1])
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pause + settings.shutdown_grace


def test_the_pod_runs_as_the_images_user(runtime: Stage) -> None:
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == image_user(runtime)
    assert "command" not in container() and "args" not in container()


def test_one_core_per_worker() -> None:
    workers = int(deployment_settings().get(f"{ENV_PREFIX}WORKERS", "1"))
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert str(resources[kind]["cpu"]) == str(workers), kind
        assert resources[kind]["memory"], kind


def test_the_keys_file_is_a_secret_directory_mounted_read_only() -> None:
    keys_file = validated(deployment_settings()).api_keys_file
    assert keys_file is not None
    (mount,) = [
        mount
        for mount in container()["volumeMounts"]
        if mount["mountPath"] == str(PurePosixPath(keys_file).parent)
    ]
    assert mount["readOnly"] is True
    # A subPath mount never sees the Secret change.
    assert "subPath" not in mount
    pod = deployment()["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "secretName" in volumes[mount["name"]]["secret"]


def test_the_services_and_the_budget_select_the_pods() -> None:
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    named_ports = {port["name"] for port in container()["ports"]}
    found = of_kind("Service")
    assert [service["spec"].get("clusterIP") for service in found].count("None") == 1
    for service in found:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports
    (budget,) = of_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()
