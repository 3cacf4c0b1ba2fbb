"""`verity dataplane run`: the data-plane agent next to one workload.

The main CLI adds this group as `verity dataplane`; `python -m verity.cli.dataplane run ...`
runs it on its own. Everything given on the command line is checked before anything starts,
so a bad file is one clear line on stderr and exit status 2; a refusal by the control plane
is exit status 1; SIGTERM or SIGINT drain Envoy and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from cryptography import x509

from verity.dataplane.agent import Agent, AgentConfig, AgentFatal, RenewalPolicy, prepare_work_dir
from verity.dataplane.bootstrap import DEFAULT_ADMIN_PORT
from verity.dataplane.cpclient import ControlPlaneTarget, check_token, parse_address
from verity.dataplane.transparent import DEFAULT_PROXY_GID, InterceptionPlan, plan_for
from verity.observe.logs import configure
from verity.resources import Dataplane, InvalidResource, load_documents

log = logging.getLogger("verity.agent")

LOG_LEVELS = ("debug", "info", "warning", "error")
ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "critical", "off")

dataplane_app = typer.Typer(
    help="Run the data-plane agent (key, certificate, SDS, Envoy) next to a workload.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataplane_app.callback()
def _group() -> None:
    """The data-plane agent."""


class UsageError(ValueError):
    """A command-line input that cannot be used; the message names it and says why."""


def read_dataplane(path: Path) -> tuple[Dataplane, str]:
    """The single Dataplane of a YAML file, validated, and its text."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--dataplane-file {path}: cannot read it ({_os_reason(exc)})") from None
    try:
        documents = load_documents(text)
    except InvalidResource as exc:
        problems = "; ".join(str(error) for error in exc.errors)
        raise UsageError(f"--dataplane-file {path}: {exc.subject}: {problems}") from None
    except ValueError as exc:  # YAML syntax
        reason = " ".join(str(exc).split())
        raise UsageError(f"--dataplane-file {path}: not valid YAML ({reason})") from None
    if len(documents) != 1 or not isinstance(documents[0], Dataplane):
        kinds = ", ".join(d.kind for d in documents) or "nothing"
        raise UsageError(f"--dataplane-file {path}: expected one Dataplane, found {kinds}")
    return documents[0], text


def read_token(path: Path) -> str:
    """The dataplane token in `path` (surrounding whitespace ignored). Never quoted back."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {path}: cannot read it ({_os_reason(exc)})") from None
    try:
        return check_token(token)
    except ValueError as exc:
        raise UsageError(f"--token-file {path}: {exc}") from None


def read_ca(path: Path) -> bytes:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--ca-cert {path}: cannot read it ({_os_reason(exc)})") from None
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise UsageError(f"--ca-cert {path}: holds no PEM certificate") from None
    return pem


def control_plane_target(
    address: str, ca_pem: bytes, server_name: str | None
) -> ControlPlaneTarget:
    try:
        host, port = parse_address(address)
        return ControlPlaneTarget(host=host, port=port, ca_pem=ca_pem, server_name=server_name)
    except ValueError as exc:
        raise UsageError(f"--cp-address: {exc}") from None


def check_ports(admin_port: int, ready_port: int | None, concurrency: int) -> None:
    for flag, port in (("--admin-port", admin_port), ("--ready-port", ready_port)):
        if port is not None and not 0 < port < 65536:
            raise UsageError(f"{flag}: {port} is not a TCP port")
    if (ready_port if ready_port is not None else admin_port + 1) in (admin_port, 65536):
        raise UsageError("--ready-port: must differ from --admin-port and be a TCP port")
    if concurrency < 1:
        raise UsageError("--concurrency: must be at least 1")


def check_key_file(path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.absolute()
    if not path.parent.is_dir():
        raise UsageError(f"--key-file {path}: its directory does not exist")
    if path.is_dir():
        raise UsageError(f"--key-file {path}: is a directory")
    return path


def resolve_ipv4(host: str, port: int) -> list[tuple[str, int]]:
    """The IPv4 addresses `host` resolves to (an IPv4 literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return sorted({(str(info[4][0]), port) for info in infos})


def interception_plan(
    dataplane: Dataplane,
    target: ControlPlaneTarget,
    *,
    proxy_gid: int,
    exclude_inbound_ports: Sequence[int],
    exclude_outbound_ports: Sequence[int],
    resolve: Callable[[str, int], list[tuple[str, int]]] = resolve_ipv4,
) -> InterceptionPlan:
    """The iptables plan of --transparent. The Dataplane must enable the transparent proxy
    itself: the control plane builds the redirect listeners from the registered Dataplane, so
    a flag that only this agent knew of would redirect traffic to ports nobody listens on."""
    if not dataplane.spec.transparent_proxy.enabled:
        raise UsageError(
            "--transparent: the Dataplane must set spec.transparentProxy.enabled: true"
        )
    try:
        control_plane = resolve(target.host, target.port)
    except OSError as exc:
        raise UsageError(
            f"--cp-address: cannot resolve {target.host} to an IPv4 address, needed to exempt "
            f"the control-plane connection from interception ({_os_reason(exc)})"
        ) from None
    try:
        return plan_for(
            dataplane,
            proxy_gid=proxy_gid,
            control_plane=control_plane,
            exclude_inbound_ports=exclude_inbound_ports,
            exclude_outbound_ports=exclude_outbound_ports,
        )
    except ValueError as exc:
        raise UsageError(f"--transparent: {exc}") from None


def _os_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or type(exc).__name__


def build_config(
    *,
    dataplane_file: Path,
    token_file: Path,
    cp_address: str,
    ca_cert: Path,
    cp_server_name: str | None,
    admin_port: int,
    ready_port: int | None,
    concurrency: int,
    work_dir: Path | None,
    key_file: Path | None,
    drain_time: int,
    envoy_log_level: str,
    renew_fraction: float,
    transparent: bool = False,
    proxy_gid: int = DEFAULT_PROXY_GID,
    exclude_inbound_ports: Sequence[int] = (),
    exclude_outbound_ports: Sequence[int] = (),
) -> tuple[AgentConfig, str]:
    """Check every input and assemble the agent's configuration and token (UsageError)."""
    dataplane, text = read_dataplane(dataplane_file)
    token = read_token(token_file)
    target = control_plane_target(cp_address, read_ca(ca_cert), cp_server_name)
    interception = (
        interception_plan(
            dataplane,
            target,
            proxy_gid=proxy_gid,
            exclude_inbound_ports=exclude_inbound_ports,
            exclude_outbound_ports=exclude_outbound_ports,
        )
        if transparent
        else None
    )
    check_ports(admin_port, ready_port, concurrency)
    if drain_time < 0:
        raise UsageError("--drain-time: must not be negative")
    try:
        renewal = RenewalPolicy(remaining_fraction=renew_fraction)
    except ValueError as exc:
        raise UsageError(f"--renew-fraction: {exc}") from None
    key_path = check_key_file(key_file)
    try:
        directory, temporary = prepare_work_dir(work_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--work-dir {exc}") from None
    config = AgentConfig(
        dataplane=dataplane,
        dataplane_yaml=text,
        control_plane=target,
        work_dir=directory,
        remove_work_dir=temporary,
        admin_port=admin_port,
        ready_port=ready_port,
        concurrency=concurrency,
        key_file=key_path,
        renewal=renewal,
        drain_time_s=drain_time,
        envoy_log_level=envoy_log_level,
        interception=interception,
    )
    return config, token


async def run_agent(config: AgentConfig, token: str) -> int:
    """Run the agent until SIGTERM/SIGINT (0) or a fatal error (1). Main thread only."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    agent = Agent(config, token)
    log.info(
        "agent starting",
        extra={
            "dataplane": config.node_id,
            "control_plane": config.control_plane.grpc_target,
            "admin_port": config.admin_port,
            "ready_port": config.effective_ready_port,
            "work_dir": str(config.work_dir),
            "transparent": config.interception is not None,
        },
    )
    if config.interception is None and config.dataplane.spec.transparent_proxy.enabled:
        log.warning(
            "the Dataplane enables the transparent proxy but --transparent is not given: "
            "this agent installs no interception rules"
        )
    try:
        await agent.run(stop)
    except AgentFatal as exc:
        log.error("agent stopped", extra={"error": str(exc)})
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return 1
    log.info("agent stopped")
    return 0


@dataplane_app.command("run")
def run(
    dataplane_file: Annotated[
        Path, typer.Option(help="The Dataplane YAML of this workload instance.")
    ],
    token_file: Annotated[Path, typer.Option(help="File holding the dataplane token.")],
    cp_address: Annotated[
        str, typer.Option(help="Control plane gRPC address, HOST:PORT (port 5678 by default).")
    ],
    ca_cert: Annotated[
        Path, typer.Option(help="CA certificate (PEM) that verifies the control plane.")
    ],
    cp_server_name: Annotated[
        str | None,
        typer.Option(help="Name on the control plane's certificate, if not the address's host."),
    ] = None,
    admin_port: Annotated[
        int, typer.Option(help="Envoy admin port (loopback only).")
    ] = DEFAULT_ADMIN_PORT,
    ready_port: Annotated[
        int | None,
        typer.Option(help="Port of /ready and /healthz on 127.0.0.1 (default: admin port + 1)."),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Envoy worker threads.")] = 1,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Private (0700) directory for the SDS socket and Envoy's bootstrap "
            "(default: a fresh temporary one, removed at exit)."
        ),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(help="Also write the private key here (0600, replaced at each renewal)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Agent log level: " + ", ".join(LOG_LEVELS))] = (
        "info"
    ),
    envoy_log_level: Annotated[str, typer.Option(help="Envoy's own log level.")] = "warn",
    drain_time: Annotated[
        int, typer.Option(help="Seconds Envoy drains connections on SIGTERM.")
    ] = 5,
    renew_fraction: Annotated[
        float,
        typer.Option(hidden=True, help="Renew when this fraction of the lifetime remains."),
    ] = 1 / 3,
    transparent: Annotated[
        bool,
        typer.Option(
            "--transparent",
            help="Install iptables rules in this network namespace that pass the app's TCP "
            "through the sidecar: all inbound TCP to redirectPortInbound, all outbound TCP to "
            "redirectPortOutbound (except loopback, the control plane and Envoy's own). "
            "Needs root (CAP_NET_ADMIN) and spec.transparentProxy.enabled; removed at exit.",
        ),
    ] = False,
    proxy_gid: Annotated[
        int,
        typer.Option(
            help="With --transparent: the group Envoy runs as; its connections are not "
            "intercepted, so no app may run with it."
        ),
    ] = DEFAULT_PROXY_GID,
    exclude_inbound_port: Annotated[
        list[int] | None,
        typer.Option(
            help="With --transparent: an inbound port not redirected (e.g. 22 for SSH); repeat."
        ),
    ] = None,
    exclude_outbound_port: Annotated[
        list[int] | None,
        typer.Option(help="With --transparent: an outbound port not redirected; repeat."),
    ] = None,
) -> None:
    """Enrol this workload with the control plane and run its Envoy sidecar."""
    if log_level.lower() not in LOG_LEVELS:
        _usage(f"--log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if envoy_log_level.lower() not in ENVOY_LOG_LEVELS:
        _usage(
            f"--envoy-log-level: {envoy_log_level!r} is not one of {', '.join(ENVOY_LOG_LEVELS)}"
        )
    configure(log_level)
    _quiet_libraries(log_level.lower())
    try:
        config, token = build_config(
            dataplane_file=dataplane_file,
            token_file=token_file,
            cp_address=cp_address,
            ca_cert=ca_cert,
            cp_server_name=cp_server_name,
            admin_port=admin_port,
            ready_port=ready_port,
            concurrency=concurrency,
            work_dir=work_dir,
            key_file=key_file,
            drain_time=drain_time,
            envoy_log_level=envoy_log_level.lower(),
            renew_fraction=renew_fraction,
            transparent=transparent,
            proxy_gid=proxy_gid,
            exclude_inbound_ports=exclude_inbound_port or (),
            exclude_outbound_ports=exclude_outbound_port or (),
        )
    except UsageError as exc:
        _usage(str(exc))
    raise typer.Exit(asyncio.run(run_agent(config, token)))


def _quiet_libraries(level: str) -> None:
    # httpx logs every admin request (readiness polls Envoy every second) at INFO.
    if level != "debug":
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _usage(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


if __name__ == "__main__":
    dataplane_app()
