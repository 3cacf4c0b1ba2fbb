"""Reading documents: YAML safety, identification, metadata, errors, store metadata."""

from __future__ import annotations

import json
from typing import Any

import pytest

from verity.resources import (
    SUPPORTED_KINDS,
    FieldError,
    InvalidResource,
    is_namespaced,
    kind_alias,
    load_documents,
    parse_document,
    with_store_metadata,
)

from .helpers import error_at, load, load_one, rejection

MESH = """
apiVersion: verity.dev/v1alpha1
kind: Mesh
metadata:
  name: default
spec: {}
"""

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  rules:
  - to:
    - operation:
        methods: ["GET"]
"""


# --- YAML --------------------------------------------------------------------------------


def test_malformed_yaml_names_document_line_and_column() -> None:
    exc = rejection(MESH + "---\napiVersion: v1\nkind: [unclosed\n")
    assert exc.subject == "document 2"
    assert len(exc.errors) == 1
    assert exc.errors[0].path.startswith("line ")
    assert "column" in exc.errors[0].path
    assert "invalid YAML" in exc.errors[0].reason


def test_malformed_yaml_position_is_absolute_in_the_text() -> None:
    exc = rejection("a: 1\nb: : 2\n")
    assert exc.errors[0].path == "line 2 column 4"


def test_duplicate_keys_are_refused() -> None:
    exc = rejection(POLICY + "  action: ALLOW\n  action: DENY\n")
    assert "duplicate key 'action'" in exc.errors[0].reason


def test_aliases_are_refused() -> None:
    exc = rejection("a: &x [1, 2]\nb: *x\n")
    assert "aliases" in exc.errors[0].reason


def test_arbitrary_objects_are_not_constructed() -> None:
    exc = rejection("!!python/object/apply:os.system ['true']\n")
    assert exc.subject == "document 1"


def test_timestamps_stay_strings() -> None:
    policy = load_one(
        POLICY.replace("namespace: foo", "namespace: foo\n  annotations:\n    at: 2024-01-01")
    )
    assert policy.annotations == {"at": "2024-01-01"}


def test_top_level_must_be_a_mapping() -> None:
    exc = rejection("- a\n- b\n")
    assert str(exc) == "document 1: must be a mapping (got a list)"


def test_empty_documents_are_skipped_but_counted() -> None:
    # An empty document, the mesh, then the bad one: the third document of the text.
    exc = rejection("---\n---\n" + MESH + "---\nkind: Nope\napiVersion: verity.dev/v1alpha1\n")
    assert exc.subject == "document 3"


def test_empty_text_has_no_resources() -> None:
    assert load_documents("") == []
    assert load_documents("# nothing\n---\n") == []


def test_json_is_accepted() -> None:
    document = {
        "apiVersion": "verity.dev/v1alpha1",
        "kind": "Mesh",
        "metadata": {"name": "default"},
        "spec": {"mtls": {"mode": "PERMISSIVE"}},
    }
    [mesh] = load_documents(json.dumps(document))
    assert mesh.to_document() == document


# --- identification ------------------------------------------------------------------------


def test_unknown_api_version_lists_the_supported_ones() -> None:
    error = error_at(MESH.replace("verity.dev/v1alpha1", "verity.dev/v9"), "apiVersion")
    assert "unsupported apiVersion 'verity.dev/v9'" in error.reason
    assert "security.istio.io/v1beta1" in error.reason and "kuma.io/v1alpha1" in error.reason


def test_unknown_kind_lists_the_kinds_of_that_api_version() -> None:
    exc = rejection(MESH.replace("kind: Mesh", "kind: Meshh"))
    assert exc.subject == "document 1"
    assert exc.errors == [
        FieldError(
            "kind",
            "unsupported kind 'Meshh' for verity.dev/v1alpha1; "
            "supported: Mesh, Dataplane, RevocationList",
        )
    ]


def test_missing_api_version() -> None:
    error = error_at("kind: Mesh\nmetadata: {name: a}\n", "apiVersion")
    assert error.reason.startswith("required field is missing")


def test_every_supported_kind_is_listed() -> None:
    assert ("verity.dev/v1alpha1", "Mesh") in SUPPORTED_KINDS
    assert ("security.istio.io/v1beta1", "RequestAuthentication") in SUPPORTED_KINDS
    assert ("kuma.io/v1alpha1", "TrafficPermission") in SUPPORTED_KINDS
    assert len(SUPPORTED_KINDS) == 11


# --- metadata ------------------------------------------------------------------------------


def test_namespaced_kind_defaults_to_namespace_default() -> None:
    policy = load_one(POLICY.replace("  namespace: foo\n", ""))
    assert policy.key() == ("AuthorizationPolicy", "default", "httpbin")
    assert "namespace" not in policy.to_document()["metadata"]


def test_cluster_scoped_kind_with_a_namespace_is_refused() -> None:
    exc = rejection(MESH.replace("name: default", "name: default\n  namespace: foo"))
    assert exc.subject == "Mesh default"
    assert exc.errors == [
        FieldError(
            "metadata.namespace", "Mesh is cluster-scoped: metadata.namespace must not be set"
        )
    ]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Httpbin", "must be a DNS-1123 name"),
        ("under_score", "must be a DNS-1123 name"),
        ("-leading", "must be a DNS-1123 name"),
        ("a" * 254, "must be at most 253 characters (got 254)"),
        ('""', "must not be empty"),
    ],
)
def test_bad_names_say_why(name: str, reason: str) -> None:
    assert (
        reason in error_at(POLICY.replace("name: httpbin", f"name: {name}"), "metadata.name").reason
    )


def test_missing_name() -> None:
    exc = rejection(POLICY.replace("  name: httpbin\n", ""))
    assert exc.subject == "document 1"
    assert FieldError("metadata.name", "required field is missing") in exc.errors


def test_bad_namespace() -> None:
    error = error_at(POLICY.replace("namespace: foo", "namespace: Foo.bar"), "metadata.namespace")
    assert "DNS-1123 label" in error.reason


def test_labels_are_validated_like_kubernetes() -> None:
    text = POLICY.replace(
        "namespace: foo", "namespace: foo\n  labels:\n    'bad key!': x\n    ok: 'bad value!'"
    )
    exc = rejection(text)
    paths = {e.path for e in exc.errors}
    assert paths == {"metadata.labels[bad key!]", "metadata.labels.ok"}


def test_label_values_must_be_strings() -> None:
    error = error_at(
        POLICY.replace("namespace: foo", "namespace: foo\n  labels: {version: 1.0}"),
        "metadata.labels.version",
    )
    assert error.reason == "must be a string (got number 1.0)"


def test_unknown_metadata_field() -> None:
    error = error_at(
        POLICY.replace("namespace: foo", "namespace: foo\n  generateName: x-"),
        "metadata.generateName",
    )
    assert error.reason == "unknown field"


def test_unknown_top_level_field() -> None:
    assert error_at(POLICY + "status: {}\n", "status").reason == "unknown field"


def test_errors_of_one_document_are_all_reported() -> None:
    text = POLICY.replace("name: httpbin", "name: Bad").replace('methods: ["GET"]', 'methods: [""]')
    exc = rejection(text + "extra: 1\n")
    assert {e.path for e in exc.errors} == {
        "metadata.name",
        "spec.rules[0].to[0].operation.methods[0]",
        "extra",
    }


def test_str_is_one_line_per_error() -> None:
    exc = rejection(POLICY.replace('["GET"]', '["GET", ""]') + "extra: 1\n")
    assert str(exc).splitlines() == [
        "AuthorizationPolicy foo/httpbin: extra: unknown field",
        "AuthorizationPolicy foo/httpbin: spec.rules[0].to[0].operation.methods[1]: "
        "must not be empty",
    ]


# --- multi-document ------------------------------------------------------------------------


def test_bad_document_in_the_middle_names_the_resource() -> None:
    bad = POLICY.replace('["GET"]', '["GET", ""]')
    exc = rejection(MESH + "---" + bad + "---" + MESH.replace("default", "other"))
    assert exc.subject == "AuthorizationPolicy foo/httpbin"


def test_bad_document_in_the_middle_without_a_name_is_numbered() -> None:
    exc = rejection(
        MESH + "---\napiVersion: verity.dev/v1alpha1\nkind: Mesh\nmetadata: {}\n---" + POLICY
    )
    assert exc.subject == "document 2"
    assert exc.errors == [FieldError("metadata.name", "required field is missing")]


def test_the_same_resource_twice_is_refused() -> None:
    exc = rejection(POLICY + "---" + POLICY)
    assert exc.errors == [FieldError("metadata.name", "the same resource is also document 1")]


def test_a_kuma_mesh_and_a_verity_mesh_of_the_same_name_collide() -> None:
    kuma = "apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n"
    exc = rejection(MESH + "---\n" + kuma)
    assert exc.subject == "Mesh default"


def test_parse_document_takes_a_mapping() -> None:
    mesh = parse_document(
        {"apiVersion": "verity.dev/v1alpha1", "kind": "Mesh", "metadata": {"name": "a"}}
    )
    assert mesh.key() == ("Mesh", "", "a")
    with pytest.raises(InvalidResource) as caught:
        parse_document({"kind": "Mesh"}, index=7)
    assert caught.value.subject == "document 7"


# --- store metadata ------------------------------------------------------------------------


def stamp(document: dict[str, Any]) -> dict[str, Any]:
    return with_store_metadata(
        document,
        uid="0c3f6d1e",
        resource_version=42,
        generation=3,
        created_at="2025-01-01T00:00:00Z",
        updated_at="2025-01-02T00:00:00Z",
    )


def test_store_metadata_goes_into_metadata() -> None:
    [policy] = load(POLICY)
    shown = stamp(policy.to_document())
    assert shown["metadata"] == {
        "name": "httpbin",
        "namespace": "foo",
        "uid": "0c3f6d1e",
        "resourceVersion": "42",
        "generation": 3,
        "creationTimestamp": "2025-01-01T00:00:00Z",
        "updateTimestamp": "2025-01-02T00:00:00Z",
    }
    assert "annotations" not in shown["metadata"]


def test_store_metadata_output_reapplies_and_is_stripped() -> None:
    [policy] = load(POLICY)
    shown = stamp(policy.to_document())
    [again] = load_documents(json.dumps(shown))
    assert again.to_document() == policy.to_document()
    assert again.resource_version == "42"
    assert policy.resource_version is None


def test_store_metadata_in_yaml_form_reapplies() -> None:
    text = POLICY.replace(
        "namespace: foo",
        "namespace: foo\n  uid: x\n  resourceVersion: '7'\n  generation: 2\n"
        "  creationTimestamp: 2025-01-01T00:00:00Z\n  updateTimestamp: 2025-01-01T00:00:00Z",
    )
    policy = load_one(text)
    assert policy.resource_version == "7"
    assert policy.to_document()["metadata"] == {"name": "httpbin", "namespace": "foo"}


def test_resource_version_must_be_digits() -> None:
    error = error_at(
        POLICY.replace("namespace: foo", "namespace: foo\n  resourceVersion: abc"),
        "metadata.resourceVersion",
    )
    assert "digits" in error.reason


def test_universal_store_metadata_is_kumactl_like_and_reapplies() -> None:
    text = "type: TrafficPermission\nname: tp\nmesh: m\nsources: [{match: {kuma.io/service: a}}]\n"
    text += "destinations: [{match: {kuma.io/service: b}}]\n"
    tp = load_one(text)
    shown = stamp(tp.to_document())
    assert list(shown)[:6] == [
        "type",
        "name",
        "mesh",
        "creationTime",
        "modificationTime",
        "resourceVersion",
    ]
    assert shown["creationTime"] == "2025-01-01T00:00:00Z"
    [again] = load_documents(json.dumps(shown))
    assert again.to_document() == tp.to_document()
    assert again.resource_version == "42"


# --- kinds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "kind"),
    [
        ("mesh", "Mesh"),
        ("Meshes", "Mesh"),
        ("meshes.kuma.io", "Mesh"),
        ("dp", "Dataplane"),
        ("dataplanes", "Dataplane"),
        ("AP", "AuthorizationPolicy"),
        ("authorizationpolicies", "AuthorizationPolicy"),
        ("authorizationpolicies.security.istio.io", "AuthorizationPolicy"),
        ("pa", "PeerAuthentication"),
        ("peerauthentication", "PeerAuthentication"),
        ("ra", "RequestAuthentication"),
        ("requestauthentications", "RequestAuthentication"),
        ("tp", "TrafficPermission"),
        ("TrafficPermissions", "TrafficPermission"),
    ],
)
def test_kind_alias(spelling: str, kind: str) -> None:
    assert kind_alias(spelling) == kind


def test_unknown_kind_alias_lists_the_kinds() -> None:
    with pytest.raises(ValueError, match="known kinds: AuthorizationPolicy, Dataplane, Mesh"):
        kind_alias("pods")


def test_is_namespaced() -> None:
    assert not is_namespaced("Mesh")
    assert not is_namespaced("TrafficPermission")
    assert is_namespaced("Dataplane")
    assert is_namespaced("ap")


# --- robustness ----------------------------------------------------------------------------


def test_null_fields_are_unset_as_in_kubernetes() -> None:
    policy = load_one(POLICY.replace("spec:", "spec:\n  selector:\n  action: null"))
    assert policy.to_document()["spec"]["selector"] is None
    exc = rejection(POLICY.replace("name: httpbin", "name: null"))
    assert FieldError("metadata.name", "required field is missing") in exc.errors


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    exc = rejection("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert exc.subject == "document 1"


def test_long_values_are_cut_in_hints() -> None:
    error = error_at(
        POLICY.replace("namespace: foo", "namespace: foo\n  labels: {a: " + "x" * 500 + "}"),
        "metadata.labels.a",
    )
    assert len(error.reason) < 300
