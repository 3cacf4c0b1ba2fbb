"""The CA service (verity/protocol/ca.proto) on the control plane's gRPC port.

Every call is authenticated by a dataplane token; the identity in the certificate, the
Dataplane it may register and the bundle it gets all come from that token, never from the
request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import grpc

from verity.controlplane import auth
from verity.controlplane.agents import AgentRegistry, AgentStatus
from verity.controlplane.identity import (
    AuthenticatedDataplane,
    authenticate_dataplane,
    bearer_secret,
)
from verity.controlplane.meshca import MeshCAs, MeshNotFound
from verity.observe.logs import scrub
from verity.pki import IdentityRevoked, InvalidCSR, IssuanceRefused, PkiError, RotationState
from verity.protocol import ca_pb2, ca_pb2_grpc
from verity.resources import Dataplane, InvalidResource, load_documents
from verity.store.base import ObjectKey, Store, StoreError, WriteAction, WriteOp

log = logging.getLogger("verity.ca")

# Streams re-read the CA state this often, so a rotation made by another replica reaches
# the agents connected here too.
BUNDLE_RECHECK_SECONDS = 2.0

T = TypeVar("T")


def bundle_message(state: RotationState) -> ca_pb2.GetTrustBundleResponse:
    return ca_pb2.GetTrustBundleResponse(
        trust_domain=state.current.trust_domain,
        trust_bundle_pem=state.bundle.pem,
        rotation_stage=state.stage.value,
        signing_root_fingerprint=state.signing_ca.root_fingerprint_sha256,
    )


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, text: str) -> NoReturn:
    await context.abort(code, scrub(text))
    raise AssertionError("abort returns only by raising")


class CertificateService(ca_pb2_grpc.CertificateServiceServicer):  # type: ignore[misc]
    def __init__(self, store: Store, cas: MeshCAs, agents: AgentRegistry) -> None:
        self._store = store
        self._cas = cas
        self._agents = agents

    async def _caller(self, context: grpc.aio.ServicerContext) -> AuthenticatedDataplane:
        try:
            secret = bearer_secret(context.invocation_metadata())
            return await authenticate_dataplane(self._store, secret, datetime.now(UTC))
        except auth.Unauthenticated as exc:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))

    async def _guard(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        """Map domain failures to gRPC status codes with one-line reasons."""
        try:
            return await work
        except MeshNotFound as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except IdentityRevoked as exc:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except (InvalidCSR, InvalidResource) as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (IssuanceRefused, PkiError) as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreError as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    async def SignCertificate(
        self, request: ca_pb2.SignCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.SignCertificateResponse:
        caller = await self._caller(context)
        return await self._guard(context, self._sign(caller, bytes(request.csr_pem)))

    async def _sign(
        self, caller: AuthenticatedDataplane, csr_pem: bytes
    ) -> ca_pb2.SignCertificateResponse:
        identity = caller.identity
        mesh = await self._cas.mesh(identity.mesh)
        spiffe_id = identity.spiffe_id(mesh.spec.trust_domain)
        issued = await self._cas.issue(identity.mesh, spiffe_id, csr_pem)
        state = await self._cas.state(identity.mesh)
        log.info(
            "certificate issued",
            extra={
                "spiffe_id": str(spiffe_id),
                "serial": f"{issued.serial:x}",
                "not_after": issued.not_after.isoformat(),
                "token_name": caller.token_name,
            },
        )
        intermediates = issued.chain_pem.removeprefix(issued.cert_pem)
        return ca_pb2.SignCertificateResponse(
            spiffe_id=str(spiffe_id),
            certificate_pem=issued.cert_pem,
            chain_pem=intermediates,
            trust_bundle_pem=state.bundle.pem,
            not_before_unix=int(issued.not_before.timestamp()),
            not_after_unix=int(issued.not_after.timestamp()),
            serial_hex=f"{issued.serial:x}",
        )

    async def GetTrustBundle(
        self, request: ca_pb2.GetTrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.GetTrustBundleResponse:
        caller = await self._caller(context)
        state = await self._guard(context, self._cas.state(caller.identity.mesh))
        return bundle_message(state)

    async def RegisterDataplane(
        self, request: ca_pb2.RegisterDataplaneRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.RegisterDataplaneResponse:
        caller = await self._caller(context)
        return await self._guard(context, self._register(caller, request.dataplane_yaml, context))

    async def _register(
        self, caller: AuthenticatedDataplane, text: str, context: grpc.aio.ServicerContext
    ) -> ca_pb2.RegisterDataplaneResponse:
        documents = load_documents(text)
        if len(documents) != 1 or not isinstance(documents[0], Dataplane):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "expected one Dataplane")
        dataplane = documents[0]
        assert isinstance(dataplane, Dataplane)
        mismatch = _identity_mismatch(caller, dataplane)
        if mismatch:
            log.warning(
                "registration refused",
                extra={
                    "token_name": caller.token_name,
                    "dataplane": dataplane.subject,
                    "reason": mismatch,
                },
            )
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, mismatch)
        op = WriteOp(
            WriteAction.APPLY,
            ObjectKey(*dataplane.key()),
            api_version=dataplane.api_version,
            labels=dict(dataplane.labels),
            document=dataplane.to_document(),
        )
        (result,) = await self._store.write([op], actor=caller.token_name)
        assert result.object is not None
        return ca_pb2.RegisterDataplaneResponse(
            namespace=dataplane.namespace,
            name=dataplane.name,
            resource_version=result.object.resource_version,
        )

    async def WatchTrustBundle(
        self,
        requests: AsyncIterator[ca_pb2.AgentReport],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ca_pb2.TrustBundleUpdate]:
        caller = await self._caller(context)
        identity = caller.identity
        mesh = await self._guard(context, self._cas.mesh(identity.mesh))
        status = AgentStatus(
            dataplane="",
            mesh=identity.mesh,
            spiffe_id=str(identity.spiffe_id(mesh.spec.trust_domain)),
        )
        handle = self._agents.connect(status)
        reader = asyncio.create_task(self._read_reports(requests, status, caller))
        try:
            async for update in self._bundle_updates(identity.mesh, context):
                yield update
        finally:
            reader.cancel()
            self._agents.disconnect(handle)

    async def _bundle_updates(
        self, mesh: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ca_pb2.TrustBundleUpdate]:
        sent: bytes | None = None
        while True:
            changed = self._agents.bundle_event(mesh)
            message = bundle_message(await self._guard(context, self._cas.state(mesh)))
            encoded = message.SerializeToString()
            if encoded != sent:
                sent = encoded
                yield ca_pb2.TrustBundleUpdate(bundle=message)
            try:
                await asyncio.wait_for(changed.wait(), BUNDLE_RECHECK_SECONDS)
            except TimeoutError:
                pass

    async def _read_reports(
        self,
        requests: AsyncIterator[ca_pb2.AgentReport],
        status: AgentStatus,
        caller: AuthenticatedDataplane,
    ) -> None:
        async for report in requests:
            status.dataplane = report.dataplane or f"{caller.identity.namespace}/?"
            status.applied_roots = frozenset(report.applied_root_fingerprints)
            status.leaf_root = report.leaf_root_fingerprint
            status.leaf_serial = report.leaf_serial_hex
            status.leaf_not_after = report.leaf_not_after_unix
            status.reported = True


def _identity_mismatch(caller: AuthenticatedDataplane, dataplane: Dataplane) -> str:
    identity = caller.identity
    wanted = (identity.mesh, identity.namespace, identity.service_account)
    got = (dataplane.spec.mesh, dataplane.namespace, dataplane.spec.service_account)
    if wanted == got:
        return ""
    return (
        f"token {caller.token_name!r} is for mesh {wanted[0]}, namespace {wanted[1]}, service "
        f"account {wanted[2]}; the Dataplane asks for mesh {got[0]}, namespace {got[1]}, "
        f"service account {got[2]}"
    )


def add_to_server(server: grpc.aio.Server, service: CertificateService) -> None:
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(service, server)


Handler = Callable[..., Any]
