"""A real Envoy enforcing `verity.xds.rbac` output, for the authorization e2e tests and bench.

Each "site" is one workload's authorization filters served on three listeners: HTTP over mTLS,
plaintext HTTP, and TCP over mTLS (an echo app behind tcp_proxy). Client certificates come
from a throwaway CA, one per SPIFFE ID, so RBAC sees a real TLS peer. The HTTP connection
managers are configured as Verity's inbound ones (normalized paths, merged slashes, the peer
address is the truth) except that they trust one X-Forwarded-For hop, so that
`remoteIpBlocks` can be exercised: the remote address is then the last XFF entry.
"""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from tests.unit.dataplane.certs import ThrowawayCA
from verity.dataplane.envoybinary import envoy_binary

# Registers every Envoy type the filters use, so that json_format can print their Any.
from verity.xds import authn, extauthz, rbac  # noqa: F401

ACCESS_LOG_FORMAT = (
    "%REQ(X-CASE)%\t%RESPONSE_CODE%\t%RESPONSE_CODE_DETAILS%\t"
    "%DYNAMIC_METADATA(envoy.filters.http.rbac)%\n"
)


def to_dict(message: Message) -> dict[str, Any]:
    found: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def three_ports() -> tuple[int, int, int]:
    first, second, third = free_ports(3)
    return first, second, third


# --- certificates -----------------------------------------------------------------------------


class Pki:
    """A throwaway CA, the server's certificate, and a client certificate per SPIFFE ID."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = ThrowawayCA()
        self.ca_path = self._write("ca.pem", self.ca.pem)
        self.server_cert, self.server_key = self._issue("spiffe://td.example/ns/foo/sa/httpbin")
        self._clients: dict[str, tuple[Path, Path]] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def _issue(self, spiffe_id: str) -> tuple[Path, Path]:
        svid = self.ca.issue(spiffe_id)
        stem = str(len(list(self.directory.iterdir())))
        return (
            self._write(f"{stem}.crt", svid.certificate_pem),
            self._write(f"{stem}.key", svid.key_pem),
        )

    def client_context(self, spiffe_id: str | None) -> ssl.SSLContext:
        """A client TLS context presenting `spiffe_id`'s certificate (None: no certificate)."""
        key = spiffe_id or ""
        if key not in self._contexts:
            context = ssl.create_default_context(cafile=str(self.ca_path))
            context.check_hostname = False  # the server is checked by its CA, not its name
            context.set_alpn_protocols(["http/1.1"])
            if spiffe_id is not None:
                if spiffe_id not in self._clients:
                    self._clients[spiffe_id] = self._issue(spiffe_id)
                cert, private = self._clients[spiffe_id]
                context.load_cert_chain(cert, private)
            self._contexts[key] = context
        return self._contexts[key]

    def downstream_tls(self) -> dict[str, Any]:
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": {
                    "alpn_protocols": ["http/1.1"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(self.server_cert)},
                            "private_key": {"filename": str(self.server_key)},
                        }
                    ],
                    "validation_context": {"trusted_ca": {"filename": str(self.ca_path)}},
                },
            },
        }


# --- local apps -------------------------------------------------------------------------------


class _App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"ok"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ExtAuthz(BaseHTTPRequestHandler):
    """An HTTP ext-authz provider: allows exactly the requests with `x-ext: allow`."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200 if self.headers.get("x-ext") == "allow" else 403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


def _serve(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


@contextmanager
def local_apps(body: bytes = b"ok") -> Iterator[tuple[int, int, int]]:
    """(HTTP app port, TCP echo port, ext-authz provider port), all on loopback."""
    handler = type("App", (_App,), {"body": body})
    servers: list[socketserver.TCPServer] = [
        ThreadingHTTPServer(("127.0.0.1", 0), handler),
        socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo),
        ThreadingHTTPServer(("127.0.0.1", 0), _ExtAuthz),
    ]
    for server in servers:
        server.daemon_threads = True  # type: ignore[attr-defined]
        _serve(server)
    try:
        yield tuple(s.server_address[1] for s in servers)  # type: ignore[misc]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


# --- the bootstrap ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One workload's filters and the ports of its three listeners."""

    http_mtls: Sequence[Message]
    http_plain: Sequence[Message]
    tcp_mtls: Sequence[Message]
    ports: tuple[int, int, int] = field(default_factory=lambda: three_ports())

    @property
    def mtls_port(self) -> int:
        return self.ports[0]

    @property
    def plain_port(self) -> int:
        return self.ports[1]

    @property
    def tcp_port(self) -> int:
        return self.ports[2]


def _router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }


def _http_manager(port: int, filters: Sequence[Message], access_log: Path) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": f"inbound_{port}",
            "normalize_path": True,
            "merge_slashes": True,
            "use_remote_address": True,
            "xff_num_trusted_hops": 1,
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                        "FileAccessLog",
                        "path": str(access_log),
                        "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                    },
                }
            ],
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "app",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                    }
                ]
            },
            "http_filters": [*(to_dict(f) for f in filters), _router()],
        },
    }


def _tcp_proxy(port: int) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": f"inbound_{port}",
            "cluster": "echo",
        },
    }


def _listener(name: str, port: int, chain: dict[str, Any]) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }
    if "transport_socket" in chain:
        # The TLS socket alone does not record the SNI: RBAC's requested_server_name (Istio's
        # connection.sni) needs the TLS inspector.
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener."
                    "tls_inspector.v3.TlsInspector"
                },
            }
        ]
    return listener


def _static_cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def bootstrap(
    sites: Sequence[Site],
    pki: Pki,
    *,
    app_port: int,
    echo_port: int,
    access_log: Path,
    admin_port: int,
    extra_clusters: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    listeners = []
    for index, site in enumerate(sites):
        mtls = {
            "filters": [_http_manager(site.mtls_port, site.http_mtls, access_log)],
            "transport_socket": pki.downstream_tls(),
        }
        plain = {"filters": [_http_manager(site.plain_port, site.http_plain, access_log)]}
        tcp = {
            "filters": [*(to_dict(f) for f in site.tcp_mtls), _tcp_proxy(site.tcp_port)],
            "transport_socket": pki.downstream_tls(),
        }
        listeners += [
            _listener(f"site{index}-mtls", site.mtls_port, mtls),
            _listener(f"site{index}-plain", site.plain_port, plain),
            _listener(f"site{index}-tcp", site.tcp_port, tcp),
        ]
    clusters = [_static_cluster("app", app_port), _static_cluster("echo", echo_port)]
    clusters += [_static_cluster(name, port) for name, port in (extra_clusters or {}).items()]
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def validate(config: dict[str, Any], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(config))
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass(frozen=True)
class EnvoyRun:
    admin_port: int
    pid: int


@contextmanager
def running_envoy(
    config: dict[str, Any], path: Path, *, log_level: str = "error"
) -> Iterator[EnvoyRun]:
    """Envoy with `config`, ready. Stopped (and its logs flushed) on exit."""
    path.write_text(json.dumps(config))
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    command = [
        str(envoy_binary()),
        "-c",
        str(path),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "-l",
        log_level,
        "--file-flush-interval-msec",
        "50",
    ]
    output = path.with_suffix(".out")
    with output.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_ready(admin, process, output)
        yield EnvoyRun(admin, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PortTaken(RuntimeError):
    """Envoy could not bind a listener port (picked free, taken since): pick others."""


def _wait_ready(admin: int, process: subprocess.Popen[bytes], output: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = output.read_text()
            if "Address already in use" in text:
                raise PortTaken(text[-500:])
            raise RuntimeError(f"Envoy exited: {text[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("Envoy did not become ready")


# --- clients ----------------------------------------------------------------------------------


class _Connection(http.client.HTTPConnection):
    """HTTP/1.1 to Envoy from `source_ip`, over TLS with `context` (None: plaintext)."""

    def __init__(
        self, port: int, source_ip: str, context: ssl.SSLContext | None, sni: str | None
    ) -> None:
        super().__init__("127.0.0.1", port, timeout=10, source_address=(source_ip, 0))
        self.tls_context, self.sni = context, sni

    def connect(self) -> None:
        super().connect()
        if self.tls_context is not None:
            self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.sni)


class Clients:
    """Keep-alive connections by (port, identity, source address, SNI)."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self._open: dict[tuple[int, str | None, str, str | None, bool], _Connection] = {}

    def _connection(
        self, port: int, identity: str | None, source_ip: str, sni: str | None, tls: bool
    ) -> _Connection:
        key = (port, identity, source_ip, sni, tls)
        if key not in self._open:
            context = self.pki.client_context(identity) if tls else None
            self._open[key] = _Connection(port, source_ip, context, sni)
        return self._open[key]

    def request(
        self,
        port: int,
        *,
        tls: bool,
        identity: str | None,
        source_ip: str,
        sni: str | None,
        method: str,
        path: str,
        host: str,
        headers: Mapping[str, str],
    ) -> int:
        """The response status (the body is read and dropped)."""
        for attempt in (1, 2):
            connection = self._connection(port, identity, source_ip, sni, tls)
            try:
                connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                connection.putheader("Host", host)
                for name, value in headers.items():
                    connection.putheader(name, value)
                connection.putheader("Content-Length", "0")
                connection.endheaders()
                response = connection.getresponse()
                response.read()
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
                return response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def tcp_allowed(self, port: int, identity: str | None, source_ip: str) -> bool:
        """Whether a TCP connection gets its bytes echoed (refused: closed or reset)."""
        raw = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source_ip, 0)
        )
        try:
            with self.pki.client_context(identity).wrap_socket(raw) as conn:
                conn.sendall(b"ping\n")
                return conn.recv(16) == b"ping\n"
        except (ssl.SSLError, ConnectionError):
            return False
        finally:
            raw.close()

    def close(self) -> None:
        for connection in self._open.values():
            connection.close()
        self._open.clear()


def read_access_log(path: Path) -> dict[str, tuple[int, str, dict[str, Any]]]:
    """Case id -> (status, response code details, RBAC dynamic metadata)."""
    found: dict[str, tuple[int, str, dict[str, Any]]] = {}
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        case, status, details, metadata = line.split("\t")
        found[case] = (int(status), details, json.loads(metadata) if metadata != "-" else {})
    return found
