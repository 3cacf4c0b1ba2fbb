"""The `verity` command. It talks to the control plane through its REST API only."""

from __future__ import annotations

import json
import sys
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
from verity.cli.durations import parse_duration
from verity.resources import InvalidResource, load_documents

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
        _fail(str(exc))


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
    _print_objects(items, output, show_namespace=all_namespaces)


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
        try:
            body["validForSeconds"] = int(parse_duration(valid_for).total_seconds())
        except ValueError as exc:
            raise CliError(f"--valid-for: {exc}") from exc
    with _client() as client:
        reply = client.request("POST", "/api/v1/tokens", json=body)
    typer.echo(reply["token"])


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
    store: Annotated[
        str | None, typer.Option("--store", help="Store URL (default: SQLite in the data dir).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the control plane until SIGTERM or Ctrl-C."""
    import asyncio

    from verity.controlplane.server import ControlPlaneConfig, run
    from verity.observe.logs import configure

    host, _, port = api_address.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--api-address: expected host:port (got {api_address!r})")
    configure(log_level)
    config = ControlPlaneConfig(
        data_dir=data_dir, api_host=host, api_port=int(port), store_url=store
    )
    asyncio.run(run(config))


if __name__ == "__main__":
    main()
