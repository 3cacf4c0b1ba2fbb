"""The marketplace's small HTTP services: users, items and invoices (seed 000's story).

Each is a plain HTTP app that knows nothing of the mesh: it listens on localhost, calls its
dependencies at plain-HTTP URLs (its sidecar's outbound listeners, or service names under a
transparent proxy), and reports the caller identity its sidecar forwarded in
`x-forwarded-client-cert`.

    python -m demo.apps --service invoices --port 8080 \
        --upstream users=http://127.0.0.1:16001 --upstream items=http://127.0.0.1:16002

Endpoints: `GET /health`; `GET /whoami` (the caller identity seen); `GET /call/<service>/<path>`
(calls a dependency and reports its status); and per service: `GET /users`, `GET /users/<id>`,
`GET /items`, `GET /items/<id>`, `POST /invoices` (looks up its user and item).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USERS: dict[str, dict[str, Any]] = {
    "1": {"id": "1", "name": "Ada"},
    "2": {"id": "2", "name": "Grace"},
}
ITEMS: dict[str, dict[str, Any]] = {
    "1": {"id": "1", "name": "keyboard", "price": 49},
    "2": {"id": "2", "name": "lamp", "price": 25},
}
_URI = re.compile(r"URI=([^;,]+)")


def caller_identity(xfcc: str | None) -> str | None:
    """The caller's SPIFFE ID from the header the sidecar sets (None: not through the mesh)."""
    if not xfcc:
        return None
    found = _URI.findall(xfcc)
    return found[-1] if found else None


def call(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 (our own upstream URLs)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
            return reply.status, _json(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())
    except OSError as exc:
        return 502, {"error": f"cannot reach {url}: {exc}"}


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return {"body": raw.decode("utf-8", "replace")[:200]}


class App:
    def __init__(self, service: str, upstreams: dict[str, str]) -> None:
        self.service = service
        self.upstreams = upstreams

    def handle(self, method: str, path: str, xfcc: str | None) -> tuple[int, Any]:
        caller = caller_identity(xfcc)
        parts = [p for p in path.split("?")[0].split("/") if p]
        if parts == ["health"]:
            return 200, {"service": self.service, "status": "ok"}
        if parts == ["whoami"]:
            return 200, {"service": self.service, "caller": caller}
        if len(parts) >= 2 and parts[0] == "call" and method == "GET":
            return self._call(parts[1], "/" + "/".join(parts[2:]))
        return self._business(method, parts, caller)

    def _call(self, service: str, path: str) -> tuple[int, Any]:
        base = self.upstreams.get(service)
        if base is None:
            return 404, {"error": f"{self.service} has no upstream {service!r}"}
        status, body = call(base.rstrip("/") + path)
        return 200, {"from": self.service, "to": service, "status": status, "body": body}

    def _business(self, method: str, parts: list[str], caller: str | None) -> tuple[int, Any]:
        tables: dict[str, dict[str, dict[str, Any]]] = {"users": USERS, "items": ITEMS}
        table = tables.get(self.service)
        if table is not None and parts[:1] == [self.service] and method == "GET":
            if len(parts) == 1:
                return 200, {"items": list(table.values()), "caller": caller}
            found = table.get(parts[1])
            return (200, {**found, "caller": caller}) if found else (404, {"error": "not found"})
        if self.service == "invoices" and parts == ["invoices"] and method == "POST":
            return self._create_invoice(caller)
        return 404, {"error": f"{method} /{'/'.join(parts)} is not an endpoint of {self.service}"}

    def _create_invoice(self, caller: str | None) -> tuple[int, Any]:
        user_status, user = call(self.upstreams.get("users", "http://users:8080") + "/users/1")
        item_status, item = call(self.upstreams.get("items", "http://items:8080") + "/items/1")
        if user_status != 200 or item_status != 200:
            return 502, {"error": "lookup failed", "users": user_status, "items": item_status}
        return 201, {
            "invoice": {"user": user["name"], "item": item["name"], "total": item["price"]},
            "caller": caller,
        }


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            status, body = app.handle(
                self.command, self.path, self.headers.get("x-forwarded-client-cert")
            )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the sidecar's access log is the record of calls

    return Handler


def serve(service: str, host: str, port: int, upstreams: dict[str, str]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(App(service, upstreams)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A marketplace service.")
    parser.add_argument(
        "--service", required=True, choices=["users", "items", "invoices", "web", "api"]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--upstream", action="append", default=[], help="name=url")
    args = parser.parse_args(argv)
    upstreams = dict(u.split("=", 1) for u in args.upstream)
    server = serve(args.service, args.host, args.port, upstreams)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"{args.service} listening on {args.host}:{args.port}", flush=True)
    stop.wait()
    server.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
