"""The REST API: resources, tokens and the audit trail, behind bearer-token auth.

Handlers are thin: parse (verity.resources), authorize (auth), write (store). Every failure a
client can cause maps to a 4xx with a one-line reason; the store's own failures map to 503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from verity import __version__
from verity.controlplane import auth
from verity.controlplane.agents import AgentRegistry
from verity.controlplane.api_check import router as check_router
from verity.controlplane.api_common import ApiError, Caller
from verity.controlplane.api_identity import router as identity_router
from verity.controlplane.api_inspect import router as inspect_router
from verity.controlplane.bodylimit import BodyLimitMiddleware, BodyTooLarge
from verity.controlplane.meshca import MeshCAs, MeshView, new_ca
from verity.controlplane.metrics import ApiMetrics
from verity.controlplane.secrets_guard import inline_private_keys
from verity.controlplane.warnings import apply_warnings
from verity.controlplane.xdscontrol import XdsController
from verity.pki import PkiError
from verity.resources import (
    InvalidResource,
    KumaMesh,
    Mesh,
    Resource,
    is_namespaced,
    kind_alias,
    load_documents,
    with_store_metadata,
)
from verity.store.base import (
    Conflict,
    NotFound,
    ObjectKey,
    StorageUnavailable,
    Store,
    StoredObject,
    TokenRecord,
    WriteAction,
    WriteOp,
    WriteResult,
)

log = logging.getLogger("verity.api")

DEFAULT_BODY_LIMIT = 4 * 1024 * 1024


class UserTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespaces: list[str] = Field(min_length=1)
    kinds: list[str] = Field(default_factory=list)
    verbs: list[str] = Field(default_factory=list)
    valid_for_seconds: int | None = Field(default=None, gt=0, alias="validForSeconds")


def _now() -> datetime:
    return datetime.now(UTC)


def _object_view(obj: StoredObject) -> dict[str, Any]:
    return with_store_metadata(
        obj.document,
        uid=obj.uid,
        resource_version=obj.resource_version,
        generation=obj.generation,
        created_at=obj.created_at,
        updated_at=obj.updated_at,
    )


def _result_view(result: WriteResult) -> dict[str, Any]:
    key = result.key
    return {
        "kind": key.kind,
        "namespace": key.namespace,
        "name": key.name,
        "outcome": str(result.outcome),
        "oldVersion": result.old_version,
        "resourceVersion": result.object.resource_version if result.object else None,
    }


def _token_view(record: TokenRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "type": record.kind,
        "scope": dict(record.scope),
        "createdAt": record.created_at,
        "expiresAt": record.expires_at,
        "revokedAt": record.revoked_at,
    }


def _store_kind(kind: str) -> str:
    try:
        return kind_alias(kind)
    except ValueError as exc:
        raise ApiError(404, str(exc)) from exc


def _namespace_for(kind: str, namespace: str | None) -> str:
    if not is_namespaced(kind):
        return ""
    return namespace or "default"


def _error_response(status: int, message: str, details: list[dict[str, str]]) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if details:
        body["details"] = details
    return JSONResponse(status_code=status, content=body)


def _invalid_details(exc: InvalidResource) -> list[dict[str, str]]:
    return [{"path": e.path, "reason": e.reason} for e in exc.errors]


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error_response(exc.status, str(exc), exc.details)

    async def invalid(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidResource)
        return _error_response(422, str(exc), _invalid_details(exc))

    async def request_invalid(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = [
            {"path": ".".join(str(p) for p in e["loc"]), "reason": str(e["msg"])}
            for e in exc.errors()
        ]
        first = details[0] if details else {"path": "request", "reason": "invalid"}
        return _error_response(422, f"{first['path']}: {first['reason']}", details)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _error_response(exc.status_code, str(exc.detail), [])

    mapping: Mapping[type[Exception], tuple[int, str]] = {
        auth.Unauthenticated: (401, "unauthenticated"),
        auth.PermissionDenied: (403, "forbidden"),
        NotFound: (404, "not found"),
        Conflict: (409, "conflict"),
        BodyTooLarge: (413, "body too large"),
        StorageUnavailable: (503, "storage unavailable"),
    }

    def simple(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handler(_: Request, exc: Exception) -> Response:
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            response = _error_response(status, str(exc), [])
            if headers:
                response.headers.update(headers)
            return response

        return handler

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(InvalidResource, invalid)
    app.add_exception_handler(RequestValidationError, request_invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for exc_type, (status, _label) in mapping.items():
        app.add_exception_handler(exc_type, simple(status))


async def _read_text(request: Request) -> str:
    raw = await request.body()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body: not valid UTF-8 at byte {exc.start}") from exc


def create_app(
    store: Store,
    *,
    body_limit: int = DEFAULT_BODY_LIMIT,
    ready: Callable[[], bool] = lambda: True,
    cas: MeshCAs | None = None,
    agents: AgentRegistry | None = None,
    xds: XdsController | None = None,
) -> FastAPI:
    app = FastAPI(title="Verity control plane", version=__version__)
    app.state.store = store
    app.state.cas = cas
    app.state.agents = agents
    app.state.xds = xds
    app.include_router(identity_router)
    app.include_router(inspect_router)
    app.include_router(check_router)
    metrics = ApiMetrics()
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=body_limit)

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.observe(request.method, path, response.status_code, time.perf_counter() - started)
        log.info(
            "request",
            extra={"method": request.method, "path": path, "status": response.status_code},
        )
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if not ready():
            return _error_response(503, "not ready", [])
        await store.revision()
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    async def write_documents(
        request: Request, who: auth.Caller, action: WriteAction, verb: str, dry_run: bool
    ) -> dict[str, Any]:
        resources = load_documents(await _read_text(request))
        if not resources:
            raise ApiError(400, "body: no documents")
        ops = []
        for res in resources:
            auth.authorize(who, verb, res.kind, res.namespace)
            _refuse_inline_keys(res)
            _check_provided_ca(res)
            expected = int(res.resource_version) if res.resource_version else None
            ops.append(
                WriteOp(
                    action=action,
                    key=ObjectKey(*res.key()),
                    api_version=res.api_version,
                    labels=dict(res.labels),
                    document=res.to_document() if action != WriteAction.DELETE else {},
                    expected_version=expected,
                )
            )
        results = await store.write(ops, actor=who.name, dry_run=dry_run)
        metrics.writes.inc(0 if dry_run else len(results))
        warnings = _warnings(resources) if action != WriteAction.DELETE else []
        return {
            "dryRun": dry_run,
            "results": [_result_view(r) for r in results],
            "warnings": warnings,
        }

    def _warnings(resources: list[Resource]) -> list[str]:
        if xds is None:
            return []
        roots = {
            r.name: r.as_verity_mesh().root_namespace
            for r in xds.index.of_kind("Mesh")
            if isinstance(r, Mesh | KumaMesh)
        }
        return apply_warnings(resources, xds.index.of_kind("Dataplane"), roots)

    @app.post("/api/v1/apply")
    async def apply(
        request: Request, who: Caller, dry_run: Annotated[bool, Query(alias="dryRun")] = False
    ) -> dict[str, Any]:
        """Create or update every document in the body (YAML or JSON), all or nothing."""
        return await write_documents(request, who, WriteAction.APPLY, "apply", dry_run)

    @app.post("/api/v1/create")
    async def create(
        request: Request, who: Caller, dry_run: Annotated[bool, Query(alias="dryRun")] = False
    ) -> dict[str, Any]:
        """Create every document in the body; 409 if any already exists."""
        return await write_documents(request, who, WriteAction.CREATE, "apply", dry_run)

    @app.post("/api/v1/update")
    async def update(
        request: Request, who: Caller, dry_run: Annotated[bool, Query(alias="dryRun")] = False
    ) -> dict[str, Any]:
        """Update existing objects; metadata.resourceVersion, when given, must be current."""
        return await write_documents(request, who, WriteAction.UPDATE, "apply", dry_run)

    @app.post("/api/v1/delete")
    async def delete_documents(
        request: Request, who: Caller, dry_run: Annotated[bool, Query(alias="dryRun")] = False
    ) -> dict[str, Any]:
        """Delete the objects the documents in the body name, all or nothing."""
        return await write_documents(request, who, WriteAction.DELETE, "delete", dry_run)

    @app.get("/api/v1/resources/{kind}")
    async def list_resources(
        kind: str,
        who: Caller,
        namespace: str | None = None,
        all_namespaces: Annotated[bool, Query(alias="allNamespaces")] = False,
        label_selector: Annotated[str | None, Query(alias="labelSelector")] = None,
    ) -> dict[str, Any]:
        store_kind = _store_kind(kind)
        ns: str | None = None if all_namespaces else _namespace_for(store_kind, namespace)
        auth.authorize(who, "get", store_kind, ns)
        labels = _parse_selector(label_selector)
        items = await store.list(kind=store_kind, namespace=ns, labels=labels)
        return {"kind": store_kind, "items": [_object_view(o) for o in items]}

    @app.get("/api/v1/resources/{kind}/{name}")
    async def get_resource(
        kind: str, name: str, who: Caller, namespace: str | None = None
    ) -> dict[str, Any]:
        store_kind = _store_kind(kind)
        ns = _namespace_for(store_kind, namespace)
        auth.authorize(who, "get", store_kind, ns)
        key = ObjectKey(store_kind, ns, name)
        obj = await store.get(key)
        if obj is None:
            raise NotFound(f"{key} not found")
        return _object_view(obj)

    @app.delete("/api/v1/resources/{kind}/{name}")
    async def delete_resource(
        kind: str,
        name: str,
        who: Caller,
        namespace: str | None = None,
        resource_version: Annotated[int | None, Query(alias="resourceVersion")] = None,
    ) -> dict[str, Any]:
        store_kind = _store_kind(kind)
        ns = _namespace_for(store_kind, namespace)
        auth.authorize(who, "delete", store_kind, ns)
        op = WriteOp(
            WriteAction.DELETE, ObjectKey(store_kind, ns, name), expected_version=resource_version
        )
        results = await store.write([op], actor=who.name)
        metrics.writes.inc()
        return _result_view(results[0])

    @app.post("/api/v1/tokens", status_code=201)
    async def create_user_token(body: UserTokenRequest, who: Caller) -> dict[str, Any]:
        auth.require_admin(who, "create tokens")
        try:
            scope = auth.user_scope(body.namespaces, body.kinds, body.verbs)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from exc
        secret = auth.new_secret(auth.USER_PREFIX)
        now = _now()
        valid_for = timedelta(seconds=body.valid_for_seconds) if body.valid_for_seconds else None
        record = TokenRecord(
            name=body.name,
            kind="user",
            secret_hash=auth.hash_secret(secret),
            scope=scope,
            created_at=now.isoformat(),
            expires_at=auth.expiry(now, valid_for),
        )
        await store.put_token(record)
        log.info("token created", extra={"token_name": body.name, "by": who.name})
        return {**_token_view(record), "token": secret}

    @app.get("/api/v1/tokens")
    async def list_tokens(who: Caller) -> dict[str, Any]:
        auth.require_admin(who, "list tokens")
        return {"items": [_token_view(t) for t in await store.list_tokens()]}

    @app.post("/api/v1/tokens/{name}/revoke")
    async def revoke_token(name: str, who: Caller) -> dict[str, Any]:
        auth.require_admin(who, "revoke tokens")
        if not await store.revoke_token(name, _now().isoformat()):
            raise NotFound(f"token {name!r} not found or already revoked")
        log.info("token revoked", extra={"token_name": name, "by": who.name})
        return {"name": name, "revoked": True}

    @app.get("/api/v1/audit")
    async def audit_log(
        who: Caller,
        kind: str | None = None,
        namespace: str | None = None,
        token: str | None = None,
        limit: Annotated[int | None, Query(gt=0, le=100_000)] = None,
    ) -> dict[str, Any]:
        auth.require_admin(who, "read the audit log")
        store_kind = _store_kind(kind) if kind else None
        entries = await store.audit_log(
            kind=store_kind, namespace=namespace, actor=token, limit=limit
        )
        return {"items": [vars(e) for e in entries]}

    @app.get("/api/v1/audit/verify")
    async def audit_verify(who: Caller) -> dict[str, Any]:
        auth.require_admin(who, "verify the audit log")
        problems = await store.audit_verify()
        return {"intact": not problems, "problems": problems}

    return app


def _check_provided_ca(resource: Resource) -> None:
    """A provided CA is checked at apply, so a bad one is refused with its reason right away."""
    if not isinstance(resource, Mesh | KumaMesh):
        return
    spec = resource.as_verity_mesh()
    if spec.ca.backend != "provided":
        return
    try:
        new_ca(MeshView(resource.name, spec), datetime.now(UTC))
    except PkiError as exc:
        raise ApiError(422, f"{resource.subject}: spec.ca.provided: {exc}") from exc


def _refuse_inline_keys(resource: Resource) -> None:
    paths = inline_private_keys(resource.to_document())
    if paths:
        raise ApiError(
            422,
            f"{resource.subject}: {paths[0]}: a private key must not be stored in a resource; "
            "give it as a file on the control-plane host (keyFile, 0600) instead",
        )


def _parse_selector(selector: str | None) -> dict[str, str] | None:
    """`app=web,tier=front` -> {"app": "web", "tier": "front"} (equality selectors only)."""
    if not selector:
        return None
    labels: dict[str, str] = {}
    for term in selector.split(","):
        key, sep, value = term.partition("=")
        if not sep or not key.strip():
            raise ApiError(400, f"labelSelector: {term!r} is not of the form key=value")
        labels[key.strip()] = value.strip().lstrip("=")
    return labels
