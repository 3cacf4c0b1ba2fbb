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

import uvicorn

from verity.controlplane import auth
from verity.controlplane.api import create_app
from verity.controlplane.clientconfig import write_client_config
from verity.store import open_store
from verity.store.base import StorageUnavailable, Store, TokenRecord

log = logging.getLogger("verity.controlplane")

ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 (a file name, not a secret)
ADDRESS_FILE = "api-address"


@dataclass(frozen=True)
class ControlPlaneConfig:
    data_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = 5681
    store_url: str | None = None
    write_client_config: bool = True


def write_private_file(path: Path, content: str) -> None:
    """Write a 0600 file atomically (the secret never exists with wider permissions)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
    write_private_file(token_file, secret + "\n")
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
    try:
        token_file = await ensure_admin_token(store, config.data_dir)
        app = create_app(store)
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
        await store.close()
        log.info("control plane stopped")


def _request_exit(server: uvicorn.Server, sig: signal.Signals) -> None:
    log.info("shutting down", extra={"signal": sig.name})
    server.should_exit = True
