from __future__ import annotations

import pytest

from verity.resources import InvalidResource, RevocationList, load_documents

DOC = """\
apiVersion: verity.dev/v1alpha1
kind: RevocationList
metadata: {{name: default}}
spec:
  identities:
  - {{spiffeId: {first}, revokedAt: "2026-12-02T00:00:00Z", reason: key leaked}}
  - {{spiffeId: {second}, revokedAt: "2026-12-02T00:00:01Z"}}
"""


def test_revocation_list_round_trips_and_lists_identities() -> None:
    text = DOC.format(first="spiffe://cluster.local/ns/shop/sa/web",
                      second="spiffe://cluster.local/ns/shop/sa/api")
    (resource,) = load_documents(text)
    assert isinstance(resource, RevocationList)
    assert resource.key() == ("RevocationList", "", "default")
    assert resource.revoked() == {
        "spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/api"
    }


def test_bad_and_duplicate_identities_are_refused_with_their_path() -> None:
    with pytest.raises(InvalidResource, match=r"spec.identities\[1\].spiffeId: .*SPIFFE ID"):
        load_documents(DOC.format(first="spiffe://cluster.local/ns/a/sa/b", second="web"))
    same = "spiffe://cluster.local/ns/a/sa/b"
    with pytest.raises(InvalidResource, match="listed twice"):
        load_documents(DOC.format(first=same, second=same))
