"""The `verity` command. It talks to the control plane through its REST API only."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from verity import __version__
from verity.cli import render
from verity.cli.client import ApiClient, CliError, resolve_target
from verity.cli.dataplane import dataplane_app
from verity.resources import InvalidResource, kind_alias, load_documents
from verity.resources.common import parse_duration

app = typer.Typer(
    name="verity",
    help="Verity: a zero-trust service mesh.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
token_app = typer.Typer(
    help="Create, list and revoke API and dataplane tokens.", no_args_is_help=True
)
token_create_app = typer.Typer(help="Create a token.", no_args_is_help=True)
audit_app = typer.Typer(
    help="Read and verify the audit trail of every write.", no_args_is_help=True
)
cp_app = typer.Typer(help="Run the control plane.", no_args_is_help=True)
identity_app = typer.Typer(help="Revoke workload identities.", no_args_is_help=True)
ca_app = typer.Typer(help="Show and rotate a mesh's certificate authority.", no_args_is_help=True)
app.add_typer(identity_app, name="identity")
app.add_typer(ca_app, name="ca")
inspect_app = typer.Typer(help="What the control plane knows about a proxy.", no_args_is_help=True)
app.add_typer(inspect_app, name="inspect")
app.add_typer(dataplane_app, name="dataplane")
app.add_typer(token_app, name="token")
token_app.add_typer(token_create_app, name="create")
app.add_typer(audit_app, name="audit")
app.add_typer(cp_app, name="control-plane")


class Output(StrEnum):
    table = "table"
    yaml = "yaml"
    json = "json"


class _Connection:
    api: str | None = None
    token: str | None = None
    token_file: Path | None = None


_connection = _Connection()


@app.callback()
def _global_options(
    api: Annotated[
        str | None,
        typer.Option(help="Control-plane API URL (default: $VERITY_API, then the local config)."),
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="API token (default: $VERITY_TOKEN, then the local config).")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="Read the API token from this file.")
    ] = None,
) -> None:
    _connection.api, _connection.token, _connection.token_file = api, token, token_file


@contextmanager
def _client() -> Iterator[ApiClient]:
    client = ApiClient(resolve_target(_connection.api, _connection.token, _connection.token_file))
    try:
        yield client
    finally:
        client.close()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except CliError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


@app.command()
def version() -> None:
    """Print the CLI version and, when reachable, the control plane's."""
    typer.echo(f"client: {__version__}")
    try:
        with _client() as client:
            typer.echo(f"control plane: {client.request('GET', '/api/v1/version')['version']}")
    except CliError as exc:
        typer.echo(f"control plane: unreachable ({exc})")


def _manifest_files(paths: list[str], recursive: bool) -> list[tuple[str, str]]:
    """(source name, text) for every file named, directory listed, or '-' (stdin)."""
    found: list[tuple[str, str]] = []
    for raw in paths:
        if raw == "-":
            found.append(("<stdin>", sys.stdin.read()))
            continue
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.suffix in {".yaml", ".yml", ".json"})
            found.extend((str(p), p.read_text()) for p in files if p.is_file())
        elif path.is_file():
            found.append((str(path), path.read_text()))
        else:
            raise CliError(f"{raw}: no such file or directory")
    return found


def _bundle(files: list[tuple[str, str]]) -> str:
    """Check every file locally (errors name the file), then join them into one request."""
    for source, text in files:
        try:
            load_documents(text)
        except InvalidResource as exc:
            raise CliError(f"{source}: {exc}") from exc
    return "\n---\n".join(text for _, text in files)


def _write(endpoint: str, files: list[str], recursive: bool, dry_run: bool) -> None:
    body = _bundle(_manifest_files(files, recursive))
    with _client() as client:
        reply = client.request("POST", endpoint, params={"dryRun": dry_run}, content=body)
    for line in render.write_results(reply["results"], dry_run):
        typer.echo(line)
    for warning in reply.get("warnings", []):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


FilesOption = Annotated[
    list[str], typer.Option("-f", "--filename", help="File, directory, or - for stdin.")
]


@app.command()
def apply(
    filename: FilesOption,
    recursive: Annotated[
        bool, typer.Option("-R", "--recursive", help="Descend into directories.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; change nothing.")
    ] = False,
) -> None:
    """Create or update resources from YAML (multi-document; all or nothing)."""
    _write("/api/v1/apply", filename, recursive, dry_run)


@app.command()
def get(
    kind: str,
    name: Annotated[str | None, typer.Argument()] = None,
    namespace: Annotated[str | None, typer.Option("-n", "--namespace")] = None,
    all_namespaces: Annotated[bool, typer.Option("-A", "--all-namespaces")] = False,
    selector: Annotated[str | None, typer.Option("-l", "--selector", help="key=value,...")] = None,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
) -> None:
    """Show resources of a kind, or one by name."""
    with _client() as client:
        if name:
            items = [
                client.request(
                    "GET", f"/api/v1/resources/{kind}/{name}", params={"namespace": namespace}
                )
            ]
        else:
            reply = client.request(
                "GET",
                f"/api/v1/resources/{kind}",
                params={
                    "namespace": namespace,
                    "allNamespaces": all_namespaces or None,
                    "labelSelector": selector,
                },
            )
            items = reply["items"]
        status = None
        if output is Output.table and _store_kind(kind) == "Dataplane":
            status = client.request(
                "GET",
                "/api/v1/dataplane-status",
                params={"namespace": None if all_namespaces else (namespace or "default")},
            )
    if status is not None:
        render.print_table(render.dataplane_table(items, status, show_namespace=all_namespaces))
        return
    _print_objects(items, output, show_namespace=all_namespaces)


def _store_kind(kind: str) -> str:
    try:
        return kind_alias(kind)
    except ValueError:
        return kind


def _print_objects(items: list[dict[str, Any]], output: Output, show_namespace: bool) -> None:
    if output is Output.json:
        typer.echo(json.dumps(items[0] if len(items) == 1 else items, indent=2))
    elif output is Output.yaml:
        typer.echo(yaml.safe_dump_all(items, sort_keys=False), nl=False)
    else:
        render.print_table(render.object_table(items, show_namespace))


@app.command()
def delete(
    kind: Annotated[str | None, typer.Argument()] = None,
    name: Annotated[str | None, typer.Argument()] = None,
    namespace: Annotated[str | None, typer.Option("-n", "--namespace")] = None,
    filename: Annotated[list[str] | None, typer.Option("-f", "--filename")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Delete a resource by kind and name, or every resource in files (all or nothing)."""
    if filename:
        _write("/api/v1/delete", filename, recursive=False, dry_run=dry_run)
        return
    if not (kind and name):
        raise CliError("delete needs KIND NAME, or -f FILE")
    with _client() as client:
        result = client.request(
            "DELETE", f"/api/v1/resources/{kind}/{name}", params={"namespace": namespace}
        )
    for line in render.write_results([result], dry_run=False):
        typer.echo(line)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@token_create_app.command("user")
def token_create_user(
    name: Annotated[str, typer.Option("--name")],
    namespace: Annotated[list[str], typer.Option("--namespace", "-n", help="Repeat, or '*'.")],
    kinds: Annotated[
        str | None, typer.Option("--kinds", help="Comma-separated; default all.")
    ] = None,
    verbs: Annotated[
        str | None, typer.Option("--verbs", help="get,apply,delete; default all.")
    ] = None,
    valid_for: Annotated[str | None, typer.Option("--valid-for", help="e.g. 720h")] = None,
) -> None:
    """Create an API token scoped to namespaces, kinds and verbs. Prints the secret once."""
    body: dict[str, Any] = {
        "name": name,
        "namespaces": namespace,
        "kinds": _csv(kinds),
        "verbs": _csv(verbs),
    }
    if valid_for:
        body["validForSeconds"] = _seconds(valid_for, "--valid-for")
    with _client() as client:
        reply = client.request("POST", "/api/v1/tokens", json=body)
    typer.echo(reply["token"])


@token_create_app.command("dataplane")
def token_create_dataplane(
    namespace: Annotated[str, typer.Option("--namespace", "-n")],
    service_account: Annotated[str, typer.Option("--service-account")],
    mesh: Annotated[str, typer.Option("--mesh")] = "default",
    name: Annotated[str | None, typer.Option("--name")] = None,
    valid_for: Annotated[str | None, typer.Option("--valid-for", help="default 720h")] = None,
) -> None:
    """Create a token bound to one workload identity. Prints the secret once."""
    body: dict[str, Any] = {
        "mesh": mesh,
        "namespace": namespace,
        "serviceAccount": service_account,
        "name": name,
    }
    if valid_for:
        body["validForSeconds"] = _seconds(valid_for, "--valid-for")
    with _client() as client:
        reply = client.request("POST", "/api/v1/tokens/dataplane", json=body)
    typer.echo(reply["token"])


def _seconds(text: str, flag: str) -> int:
    try:
        seconds = int(parse_duration(text).total_seconds())
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}") from exc
    if seconds <= 0:
        raise CliError(f"{flag}: {text!r} must be at least one second")
    return seconds


@identity_app.command("revoke")
def identity_revoke(
    spiffe_id: str,
    mesh: Annotated[str, typer.Option("--mesh")] = "default",
    reason: Annotated[str, typer.Option("--reason")] = "",
) -> None:
    """Stop issuing certificates for an identity, deny it in traffic, revoke its tokens."""
    with _client() as client:
        reply = client.request(
            "POST",
            "/api/v1/identities/revoke",
            json={"spiffeId": spiffe_id, "mesh": mesh, "reason": reason},
        )
    tokens = ", ".join(reply["revokedTokens"]) or "none"
    typer.echo(
        f"identity {reply['spiffeId']} revoked in mesh {reply['mesh']} (tokens revoked: {tokens})"
    )


@ca_app.command("show")
def ca_show(
    mesh: Annotated[str, typer.Option("--mesh")] = "default",
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
) -> None:
    """The mesh's roots (certificates only), fingerprints, expiry and rotation stage."""
    with _client() as client:
        view = client.request("GET", f"/api/v1/meshes/{mesh}/ca")
    if output is not Output.table:
        _print_objects([view], output, show_namespace=False)
        return
    for line in render.ca_summary(view):
        typer.echo(line)
    render.print_table(render.roots_table(view["roots"]))


@ca_app.command("rotate")
def ca_rotate(
    mesh: Annotated[str, typer.Option("--mesh")] = "default",
    step: Annotated[bool, typer.Option("--step", help="Advance one stage only.")] = False,
    timeout: Annotated[str, typer.Option("--timeout", help="Per stage.")] = "10m",
) -> None:
    """Rotate the root: add the new root, reissue leaves, remove the old root.

    Each stage waits until it has reached every connected proxy before the next one starts.
    """
    per_stage = _seconds(timeout, "--timeout")
    with _client() as client:
        view = _advance(client, mesh, per_stage)
        while not step and view["stage"] != "STABLE":
            view = _advance(client, mesh, per_stage)


def _advance(client: ApiClient, mesh: str, timeout_s: int) -> dict[str, Any]:
    """POST rotate until the gate opens, printing progress while proxies catch up."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            view: dict[str, Any] = client.request("POST", f"/api/v1/meshes/{mesh}/ca/rotate")
            typer.echo(render.progress_line(view, reached_stage=True))
            return view
        except CliError as exc:
            if "reached every proxy" not in str(exc):
                raise
            gate = exc
        current = client.request("GET", f"/api/v1/meshes/{mesh}/ca")
        line = render.progress_line(current)
        if line != last:
            typer.echo(line)
            last = line
        if time.monotonic() > deadline:
            raise CliError(f"stage {current['stage']} did not reach every proxy in time: {gate}")
        time.sleep(0.5)


@app.command()
def check(
    to: Annotated[str, typer.Option("--to", help="Destination service.")],
    source: Annotated[
        str | None, typer.Option("--from", help="Caller SPIFFE ID; omit for a plaintext caller.")
    ] = None,
    namespace: Annotated[str, typer.Option("-n", "--namespace")] = "default",
    port: Annotated[int | None, typer.Option("--port", help="Destination inbound port.")] = None,
    method: Annotated[str, typer.Option("--method")] = "GET",
    path: Annotated[str, typer.Option("--path")] = "/",
    host: Annotated[str, typer.Option("--host")] = "",
    header: Annotated[list[str] | None, typer.Option("--header", help="k=v; repeat.")] = None,
    source_ip: Annotated[str, typer.Option("--source-ip")] = "127.0.0.1",
    jwt_claims: Annotated[str | None, typer.Option("--jwt-claims", help="JSON object.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Print every step.")] = False,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
) -> None:
    """Would this request be allowed? The decision, the policy and rule, and why."""
    headers = {}
    for item in header or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--header: expected k=v (got {item!r})")
        headers[key] = value
    claims = None
    if jwt_claims is not None:
        try:
            claims = json.loads(jwt_claims)
        except ValueError as exc:
            raise CliError(f"--jwt-claims: not JSON: {exc}") from exc
    body = {
        "from": source,
        "to": to,
        "namespace": namespace,
        "port": port,
        "method": method,
        "path": path,
        "host": host,
        "headers": headers,
        "sourceIp": source_ip,
        "jwtClaims": claims,
    }
    with _client() as client:
        view = client.request("POST", "/api/v1/check", json=body)
    if output is not Output.table:
        _print_objects([view], output, show_namespace=False)
        return
    for line in render.check_lines(view, explain):
        typer.echo(line)


@inspect_app.command("dataplane")
def inspect_dataplane(
    name: str,
    namespace: Annotated[str, typer.Option("-n", "--namespace")] = "default",
    config_dump: Annotated[
        bool, typer.Option("--config-dump", help="Also print Envoy's own view (local admin).")
    ] = False,
    admin_port: Annotated[int, typer.Option("--admin-port")] = 9901,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
) -> None:
    """Connection, xDS versions (ACK/NACK), certificate, and each port's mTLS mode and why."""
    with _client() as client:
        view = client.request("GET", f"/api/v1/inspect/dataplanes/{namespace}/{name}")
    if output is Output.table:
        for line in render.inspect_lines(view):
            typer.echo(line)
    else:
        _print_objects([view], output, show_namespace=False)
    if config_dump:
        typer.echo(_envoy_config_dump(admin_port))


def _envoy_config_dump(admin_port: int) -> str:
    import httpx

    try:
        reply = httpx.get(f"http://127.0.0.1:{admin_port}/config_dump", timeout=10)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach Envoy's admin on 127.0.0.1:{admin_port}: {exc}") from exc
    return reply.text


@token_app.command("list")
def token_list() -> None:
    """List tokens (names and scopes, never the secrets)."""
    with _client() as client:
        reply = client.request("GET", "/api/v1/tokens")
    render.print_table(render.token_table(reply["items"]))


@token_app.command("revoke")
def token_revoke(name: str) -> None:
    """Revoke a token by name; it is refused from then on."""
    with _client() as client:
        client.request("POST", f"/api/v1/tokens/{name}/revoke")
    typer.echo(f"token {name} revoked")


@audit_app.command("log")
def audit_log(
    kind: Annotated[str | None, typer.Option("--kind")] = None,
    namespace: Annotated[str | None, typer.Option("-n", "--namespace")] = None,
    token: Annotated[
        str | None, typer.Option("--token-name", help="Only writes by this token.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the newest N entries.")] = None,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
) -> None:
    """Show who changed what, and when."""
    with _client() as client:
        reply = client.request(
            "GET",
            "/api/v1/audit",
            params={"kind": kind, "namespace": namespace, "token": token, "limit": limit},
        )
    if output is Output.table:
        render.print_table(render.audit_table(reply["items"]))
    else:
        _print_objects(reply["items"], output, show_namespace=True)


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the audit trail's hash chain; exits non-zero if an entry was changed or removed."""
    with _client() as client:
        reply = client.request("GET", "/api/v1/audit/verify")
    if reply["intact"]:
        typer.echo("audit trail intact")
        return
    for problem in reply["problems"]:
        typer.echo(problem)
    raise CliError(f"audit trail tampered: {len(reply['problems'])} problem(s)")


@cp_app.command("run")
def control_plane_run(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the store and secrets live.")
    ] = Path("./verity-data"),
    api_address: Annotated[
        str, typer.Option("--api-address", help="host:port of the REST API.")
    ] = "127.0.0.1:5681",
    grpc_address: Annotated[
        str, typer.Option("--grpc-address", help="host:port of the CA service and ADS (TLS).")
    ] = "0.0.0.0:5678",
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="Name or IP agents use to reach the gRPC port; repeat."),
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Store URL (default: SQLite in the data dir).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the control plane until SIGTERM or Ctrl-C."""
    import asyncio

    from verity.controlplane.server import ControlPlaneConfig, run
    from verity.observe.logs import configure

    host, port = _host_port(api_address, "--api-address")
    grpc_host, grpc_port = _host_port(grpc_address, "--grpc-address")
    configure(log_level)
    names = tuple(server_name or ("localhost", "127.0.0.1"))
    config = ControlPlaneConfig(
        data_dir=data_dir,
        api_host=host,
        api_port=port,
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        server_names=names,
        store_url=store,
    )
    asyncio.run(run(config))


def _host_port(value: str, flag: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CliError(f"{flag}: expected host:port (got {value!r})")
    return host, int(port)


if __name__ == "__main__":
    main()
