"""The control-plane process: opens the store, makes sure an admin token exists, serves the API.

Shutdown is clean on SIGTERM and SIGINT: the API stops accepting, in-flight requests finish,
the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import uvicorn

from verity.controlplane import auth
from verity.controlplane.agents import AgentRegistry
from verity.controlplane.api import create_app
from verity.controlplane.ca_service import CertificateService, add_to_server
from verity.controlplane.clientconfig import write_client_config
from verity.controlplane.meshca import MeshCAs
from verity.controlplane.privatefile import write_private_file
from verity.controlplane.servingtls import CA_CERT, ensure_serving_credentials
from verity.controlplane.xdscontrol import XdsController
from verity.pki import load_kek
from verity.resources import load_documents
from verity.store import open_store
from verity.store.base import (
    Conflict,
    ObjectKey,
    StorageUnavailable,
    Store,
    TokenRecord,
    WriteAction,
    WriteOp,
)
from verity.xds.ads import SERVER_OPTIONS, serve_ads

log = logging.getLogger("verity.controlplane")

ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 (a file name, not a secret)
ADDRESS_FILE = "api-address"


@dataclass(frozen=True)
class ControlPlaneConfig:
    data_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = 5681
    grpc_host: str = "0.0.0.0"  # noqa: S104 (agents on other hosts connect; TLS + tokens)
    grpc_port: int = 5678
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    store_url: str | None = None
    write_client_config: bool = True


DEFAULT_MESH = """\
apiVersion: verity.dev/v1alpha1
kind: Mesh
metadata:
  name: default
spec: {}
"""


async def ensure_default_mesh(store: Store) -> None:
    """Like Kuma, start with a `default` mesh (STRICT mTLS, default deny) if there is none."""
    if await store.list(kind="Mesh"):
        return
    (mesh,) = load_documents(DEFAULT_MESH)
    op = WriteOp(
        WriteAction.CREATE,
        ObjectKey(*mesh.key()),
        api_version=mesh.api_version,
        document=mesh.to_document(),
    )
    try:
        await store.write([op], actor="system")
    except Conflict:
        pass  # another replica created it first


async def ensure_admin_token(store: Store, data_dir: Path) -> Path:
    """Create the admin token on first start; reuse it while its file and record both exist."""
    token_file = data_dir / ADMIN_TOKEN_FILE
    if token_file.exists():
        secret = token_file.read_text().strip()
        if await store.find_token(auth.hash_secret(secret)) is not None:
            return token_file
    names = {t.name for t in await store.list_tokens()}
    name = auth.ADMIN_NAME
    suffix = 1
    while name in names:
        suffix += 1
        name = f"{auth.ADMIN_NAME}-{suffix}"
    secret = auth.new_secret(auth.USER_PREFIX)
    await store.put_token(
        TokenRecord(
            name=name,
            kind="user",
            secret_hash=auth.hash_secret(secret),
            scope=auth.user_scope(["*"], ["*"], list(auth.VERBS), admin=True),
            created_at=datetime.now(UTC).isoformat(),
            expires_at=None,
        )
    )
    write_private_file(token_file, (secret + "\n").encode())
    log.info("admin token created", extra={"token_name": name, "file": str(token_file)})
    return token_file


class _ApiServer(uvicorn.Server):
    """uvicorn, minus its own signal handling: the control plane owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _prepare_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SystemExit(f"error: cannot create data dir {data_dir}: {exc.strerror}") from exc


def _bound_address(server: uvicorn.Server) -> str:
    for srv in server.servers:
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            return f"http://{host}:{port}"
    raise RuntimeError("API server has no listening socket")


async def run(config: ControlPlaneConfig) -> None:
    _prepare_data_dir(config.data_dir)
    store = open_store(config.store_url or str(config.data_dir / "verity.db"))
    try:
        await store.open()
    except StorageUnavailable as exc:
        raise SystemExit(f"error: {exc}") from exc
    grpc_server: grpc.aio.Server | None = None
    xds: XdsController | None = None
    try:
        token_file = await ensure_admin_token(store, config.data_dir)
        await ensure_default_mesh(store)
        kek = load_kek(os.environ, config.data_dir / "kek", generate_if_missing=True)
        cas = MeshCAs(store, kek)
        agents = AgentRegistry()
        xds = XdsController(store)
        await xds.start()
        grpc_server = await start_grpc(config, CertificateService(store, cas, agents), xds)
        app = create_app(store, cas=cas, agents=agents, xds=xds)
        server = _ApiServer(
            uvicorn.Config(
                app,
                host=config.api_host,
                port=config.api_port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _request_exit, server, sig)
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            address = _bound_address(server)
            (config.data_dir / ADDRESS_FILE).write_text(address + "\n")
            if config.write_client_config:
                write_client_config(address, token_file)
            log.info("control plane ready", extra={"api": address, "pid": os.getpid()})
        await serving
        if not server.started:
            raise SystemExit(f"cannot serve the API on {config.api_host}:{config.api_port}")
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        if xds is not None:
            await xds.stop()
        await store.close()
        log.info("control plane stopped")


async def start_grpc(
    config: ControlPlaneConfig, ca: CertificateService, xds: XdsController
) -> grpc.aio.Server:
    """The gRPC port (CA service and ADS) over TLS with the control plane's serving cert."""
    creds = ensure_serving_credentials(config.data_dir, list(config.server_names))
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    add_to_server(server, ca)
    serve_ads(server, xds.ads)
    address = f"{config.grpc_host}:{config.grpc_port}"
    bound = server.add_secure_port(
        address, grpc.ssl_server_credentials([(creds.key_pem, creds.cert_pem)])
    )
    if not bound:
        raise SystemExit(f"error: cannot serve gRPC on {address}")
    await server.start()
    log.info("grpc serving", extra={"address": address, "ca_file": str(config.data_dir / CA_CERT)})
    return server


def _request_exit(server: uvicorn.Server, sig: signal.Signals) -> None:
    log.info("shutting down", extra={"signal": sig.name})
    server.should_exit = True
