from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignCertificateRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class SignCertificateResponse(_message.Message):
    __slots__ = ("spiffe_id", "certificate_pem", "chain_pem", "trust_bundle_pem", "not_before_unix", "not_after_unix", "serial_hex")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_UNIX_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    certificate_pem: bytes
    chain_pem: bytes
    trust_bundle_pem: bytes
    not_before_unix: int
    not_after_unix: int
    serial_hex: str
    def __init__(self, spiffe_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., chain_pem: _Optional[bytes] = ..., trust_bundle_pem: _Optional[bytes] = ..., not_before_unix: _Optional[int] = ..., not_after_unix: _Optional[int] = ..., serial_hex: _Optional[str] = ...) -> None: ...

class GetTrustBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrustBundleResponse(_message.Message):
    __slots__ = ("trust_domain", "trust_bundle_pem", "rotation_stage", "signing_root_fingerprint")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    ROTATION_STAGE_FIELD_NUMBER: _ClassVar[int]
    SIGNING_ROOT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    trust_bundle_pem: bytes
    rotation_stage: str
    signing_root_fingerprint: str
    def __init__(self, trust_domain: _Optional[str] = ..., trust_bundle_pem: _Optional[bytes] = ..., rotation_stage: _Optional[str] = ..., signing_root_fingerprint: _Optional[str] = ...) -> None: ...

class RegisterDataplaneRequest(_message.Message):
    __slots__ = ("dataplane_yaml",)
    DATAPLANE_YAML_FIELD_NUMBER: _ClassVar[int]
    dataplane_yaml: str
    def __init__(self, dataplane_yaml: _Optional[str] = ...) -> None: ...

class RegisterDataplaneResponse(_message.Message):
    __slots__ = ("namespace", "name", "resource_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    resource_version: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., resource_version: _Optional[int] = ...) -> None: ...

class AgentReport(_message.Message):
    __slots__ = ("dataplane", "applied_root_fingerprints", "leaf_root_fingerprint", "leaf_serial_hex", "leaf_not_after_unix")
    DATAPLANE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_ROOT_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    LEAF_ROOT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEAF_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    dataplane: str
    applied_root_fingerprints: _containers.RepeatedScalarFieldContainer[str]
    leaf_root_fingerprint: str
    leaf_serial_hex: str
    leaf_not_after_unix: int
    def __init__(self, dataplane: _Optional[str] = ..., applied_root_fingerprints: _Optional[_Iterable[str]] = ..., leaf_root_fingerprint: _Optional[str] = ..., leaf_serial_hex: _Optional[str] = ..., leaf_not_after_unix: _Optional[int] = ...) -> None: ...

class TrustBundleUpdate(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: GetTrustBundleResponse
    def __init__(self, bundle: _Optional[_Union[GetTrustBundleResponse, _Mapping]] = ...) -> None: ...
