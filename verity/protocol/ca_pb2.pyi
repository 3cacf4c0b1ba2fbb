from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

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
    __slots__ = ("trust_domain", "trust_bundle_pem", "rotation_stage")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    ROTATION_STAGE_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    trust_bundle_pem: bytes
    rotation_stage: str
    def __init__(self, trust_domain: _Optional[str] = ..., trust_bundle_pem: _Optional[bytes] = ..., rotation_stage: _Optional[str] = ...) -> None: ...
