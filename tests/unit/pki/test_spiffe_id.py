from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verity.pki import InvalidSpiffeId, SpiffeId, validate_trust_domain


def test_parse_and_str_round_trip() -> None:
    identity = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
    assert identity == SpiffeId("cluster.local", "default", "web")
    assert str(identity) == "spiffe://cluster.local/ns/default/sa/web"
    assert identity.uri == str(identity)


def test_build() -> None:
    assert str(SpiffeId.build("prod.example", "pay-ments", "api_v2.1")) == (
        "spiffe://prod.example/ns/pay-ments/sa/api_v2.1"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://cluster.local/ns/a/sa/b", "does not start with"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "does not start with"),
        ("spiffe://Cluster.local/ns/a/sa/b", "must be lowercase"),
        ("spiffe://cluster.local:8443/ns/a/sa/b", "port"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "userinfo"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
        ("spiffe://cluster.local/ns/a%20b/sa/b", "percent-encoded"),
        ("spiffe://clu%73ter.local/ns/a/sa/b", "percent-encoded"),
        ("spiffe://cluster.local/ns/./sa/b", "'.' or '..'"),
        ("spiffe://cluster.local/ns/a/sa/..", "'.' or '..'"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
        ("spiffe://cluster.local/ns/a/sa/b/", "does not have the path"),
        ("spiffe://cluster.local/ns/a", "does not have the path"),
        ("spiffe://cluster.local", "does not have the path"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://cluster.local/ns/a/sa/b c", "may contain only"),
        ("spiffe://clus ter/ns/a/sa/b", "may contain only"),
        ("spiffe://cluster.local/namespace/a/sa/b", "does not have the path"),
    ],
)
def test_invalid_ids_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=None) as caught:
        SpiffeId.parse(text)
    assert reason in str(caught.value)


def test_overlong_id_refused() -> None:
    with pytest.raises(InvalidSpiffeId, match="longer than 2048"):
        SpiffeId("a", "n" * 1500, "s" * 1500)
    with pytest.raises(InvalidSpiffeId, match="longer than 255"):
        validate_trust_domain("a" * 256)


_segment = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"),
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))
_trust_domain = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789.-_"), min_size=1, max_size=30
)


@given(_trust_domain, _segment, _segment)
def test_every_valid_id_round_trips(trust_domain: str, namespace: str, account: str) -> None:
    identity = SpiffeId(trust_domain, namespace, account)
    assert SpiffeId.parse(str(identity)) == identity


@given(st.text(max_size=60))
def test_arbitrary_text_parses_to_a_round_tripping_id_or_is_refused(text: str) -> None:
    try:
        identity = SpiffeId.parse("spiffe://" + text)
    except InvalidSpiffeId:
        return
    assert str(identity) == "spiffe://" + text
