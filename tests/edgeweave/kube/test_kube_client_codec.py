"""edgeweave.kube.client / informer without a server: watch stream codec, Status errors,
backoff, URL paths, kubeconfig loading, the informer's cache and relist diff."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeweave.kube import errors
from edgeweave.kube.client import (
    Backoff,
    KubeClient,
    KubeconfigError,
    RetryPolicy,
    Unauthorized,
    UnexpectedStatus,
    WatchDecoder,
    WatchEvent,
    WatchProtocolError,
    error_from_status,
    load_kubeconfig,
    parse_watch_event,
    resource_path,
)
from edgeweave.kube.informer import Change, Informer
from edgeweave.kube.resources import DEPLOYMENTS, NODEGROUPS, NODES, PODS
from edgeweave.pki import ADMIN, CertificateAuthority, kubeconfig_document, write_kubeconfig

Obj = dict[str, Any]

# ---- watch stream codec -----------------------------------------------------------------------

STREAM = (
    b'{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"5"}}}\n'
    b"\n"
    b'{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"9"}}}\r\n'
    b'{"type":"DELETED","object":{"metadata":{"name":"\xc3\xa9","resourceVersion":"10"}}}\n'
)
EXPECTED = [
    WatchEvent("ADDED", {"metadata": {"name": "a", "resourceVersion": "5"}}),
    WatchEvent("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "9"}}),
    WatchEvent("DELETED", {"metadata": {"name": "é", "resourceVersion": "10"}}),
]


def _decode(chunks: list[bytes]) -> list[WatchEvent]:
    decoder = WatchDecoder()
    out: list[WatchEvent] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    out.extend(decoder.finish())
    return out


def test_kube_client_decoder_every_chunking() -> None:
    assert _decode([STREAM]) == EXPECTED
    assert _decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED
    for cut in range(len(STREAM) + 1):
        assert _decode([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    assert [e.resource_version for e in EXPECTED] == ["5", "9", "10"]


def test_kube_client_decoder_last_event_without_newline() -> None:
    decoder = WatchDecoder()
    assert decoder.feed(STREAM.rstrip(b"\n")) == EXPECTED[:2]
    assert decoder.pending > 0
    assert decoder.finish() == EXPECTED[2:]


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "SOMETHING", "object": {}}',
        b'{"type": "ADDED"}',
        b'{"type": "ADDED", "object": "text"}',
        b"\xff\xfe",
    ],
)
def test_kube_client_decoder_rejects_garbage(line: bytes) -> None:
    with pytest.raises(WatchProtocolError):
        WatchDecoder().feed(line + b"\n")
    with pytest.raises(WatchProtocolError):
        parse_watch_event(line)
    good = STREAM.split(b"\n")[0] + b"\n"
    with pytest.raises(WatchProtocolError) as info:
        WatchDecoder().feed(good + line + b"\n")
    assert info.value.events == EXPECTED[:1]  # what came before the garbage is kept


def test_kube_client_decoder_limits_line_length() -> None:
    decoder = WatchDecoder(max_line_bytes=64)
    assert decoder.feed(b'{"type":') == []
    with pytest.raises(WatchProtocolError, match="longer than 64"):
        decoder.feed(b" " * 100)


# ---- Status errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        errors.not_found("pods", "web-0"),
        errors.already_exists("deployments.apps", "web", "apps"),
        errors.conflict("pods", "web-0", errors.OPTIMISTIC_LOCK_MESSAGE),
        errors.Gone("too old resource version: 5 (9)"),
        errors.invalid("Pod", "x", [errors.Cause("metadata.name", "Invalid value: bad")]),
        errors.BadRequest("bad selector"),
        errors.Forbidden("namespace is terminating"),
        errors.UnsupportedMediaType("no SMP for CRs"),
        errors.InternalError("disk on fire"),
        errors.TooLargeResourceVersion(
            "Too large resource version: 99, current: 5",
            causes=[errors.Cause("", "Too large resource version", "ResourceVersionTooLarge")],
            retry_after_seconds=1,
        ),
    ],
    ids=lambda e: type(e).__name__,
)
def test_kube_client_errors_round_trip(error: errors.StoreError) -> None:
    rebuilt = error_from_status(error.code, json.loads(json.dumps(error.to_status())))
    assert type(rebuilt) is type(error)
    assert rebuilt.to_status() == error.to_status()


@pytest.mark.parametrize(
    ("http", "body", "cls", "text"),
    [
        (
            401,
            {"kind": "Status", "reason": "Unauthorized", "code": 401, "message": "Unauthorized"},
            Unauthorized,
            "Unauthorized",
        ),
        (403, None, errors.Forbidden, "HTTP 403"),
        (502, "<html>Bad Gateway</html>", UnexpectedStatus, "HTTP 502: <html>Bad Gateway</html>"),
        (
            409,
            {"reason": "AlreadyExists", "code": 409, "message": "exists"},
            errors.AlreadyExists,
            "exists",
        ),
        (
            200,
            {"kind": "Status", "code": 410, "reason": "Expired", "message": "old"},
            errors.Gone,
            "old",
        ),
    ],
)
def test_kube_client_errors_from_odd_answers(
    http: int, body: Any, cls: type[errors.StoreError], text: str
) -> None:
    err = error_from_status(http, body)
    assert type(err) is cls
    assert text in err.message
    if isinstance(err, UnexpectedStatus):
        assert err.http_status == 502


# ---- backoff and paths ------------------------------------------------------------------------


def test_kube_client_backoff_sequence() -> None:
    backoff = Backoff(RetryPolicy(initial_s=0.5, factor=2, max_s=3, jitter=0, max_attempts=5))
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1, 2, 3, 3]
    exhausted_after_five = backoff.exhausted
    backoff.reset()
    assert exhausted_after_five and not backoff.exhausted
    assert backoff.next_delay() == 0.5
    jittered = Backoff(RetryPolicy(initial_s=1, jitter=0.5), rng=random.Random(7))
    assert all(1 <= jittered.next_delay() / (2**i) < 1.5 for i in range(3))


@pytest.mark.parametrize(
    ("res", "kwargs", "path"),
    [
        (PODS, {}, "/api/v1/pods"),
        (PODS, {"namespace": "default"}, "/api/v1/namespaces/default/pods"),
        (
            PODS,
            {"namespace": "d", "name": "p", "subresource": "status"},
            "/api/v1/namespaces/d/pods/p/status",
        ),
        (NODES, {"namespace": "ignored", "name": "n1"}, "/api/v1/nodes/n1"),
        (DEPLOYMENTS, {"namespace": "d", "name": "w"}, "/apis/apps/v1/namespaces/d/deployments/w"),
        (NODEGROUPS, {"name": "g"}, "/apis/apps.kubeedge.io/v1alpha1/nodegroups/g"),
    ],
)
def test_kube_client_resource_paths(res: Any, kwargs: Obj, path: str) -> None:
    assert resource_path(res, **kwargs) == path


def test_kube_client_rejects_bad_server_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        KubeClient("ftp://example.com")
    with pytest.raises(ValueError, match="http"):
        KubeClient("127.0.0.1:6443")


# ---- kubeconfig -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_kube_client_kubeconfig_cert_user(tmp_path: Path, ca: CertificateAuthority) -> None:
    client = ca.issue_client_cert(ADMIN)
    path = tmp_path / "admin.kubeconfig"
    write_kubeconfig(
        path,
        kubeconfig_document(
            server="https://127.0.0.1:6443", ca_cert_pem=ca.cert_pem(), user="admin", client=client
        ),
    )
    access = load_kubeconfig(path)
    assert access.server == "https://127.0.0.1:6443"
    assert access.token is None and access.ssl is not None
    assert access.context == "admin@edgeweave"
    assert len(access.ssl.get_ca_certs()) == 1


def test_kube_client_kubeconfig_files_relative_and_token_file(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    client = ca.issue_client_cert(ADMIN)
    (tmp_path / "pki").mkdir()
    client.write(tmp_path / "pki" / "admin.crt", tmp_path / "pki" / "admin.key")
    (tmp_path / "pki" / "ca.crt").write_bytes(ca.cert_pem())
    (tmp_path / "token").write_text("s3cret\n")
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://10.0.0.1:6443",
                    "certificate-authority": "pki/ca.crt",
                    "tls-server-name": "kubernetes",
                },
            }
        ],
        "users": [
            {
                "name": "cert",
                "user": {"client-certificate": "pki/admin.crt", "client-key": "pki/admin.key"},
            },
            {"name": "tok", "user": {"tokenFile": "token"}},
        ],
        "contexts": [
            {"name": "a", "context": {"cluster": "c", "user": "cert"}},
            {"name": "b", "context": {"cluster": "c", "user": "tok"}},
        ],
        "current-context": "a",
    }
    path = tmp_path / "kc.yaml"
    path.write_text(yaml.safe_dump(doc))
    access = load_kubeconfig(path)
    assert access.tls_server_name == "kubernetes" and access.token is None
    token_access = load_kubeconfig(path, context="b")
    assert token_access.token == "s3cret"
    plain = tmp_path / "plain.yaml"
    plain.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "m", "cluster": {"server": "http://127.0.0.1:10550"}}],
                "contexts": [{"name": "m", "context": {"cluster": "m"}}],
                "current-context": "m",
            }
        )
    )
    meta = load_kubeconfig(plain)
    assert meta.ssl is None and meta.server == "http://127.0.0.1:10550"


def _kubeconfig(ca: CertificateAuthority, **changes: Any) -> Obj:
    client = ca.issue_client_cert(ADMIN)
    cluster: Obj = {
        "server": "https://127.0.0.1:6443",
        "certificate-authority-data": _b64(ca.cert_pem()),
    }
    user: Obj = {
        "client-certificate-data": _b64(client.cert_pem()),
        "client-key-data": _b64(client.key_pem()),
    }
    cluster.update(changes.pop("cluster", {}))
    user.update(changes.pop("user", {}))
    doc: Obj = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {k: v for k, v in cluster.items() if v is not None}}],
        "users": [{"name": "u", "user": {k: v for k, v in user.items() if v is not None}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"current-context": None}, "current-context: not set"),
        ({"current-context": "nope"}, 'contexts: no entry named "nope"'),
        (
            {"contexts": [{"name": "x", "context": {"cluster": "gone", "user": "u"}}]},
            'clusters: no entry named "gone"',
        ),
        (
            {"contexts": [{"name": "x", "context": {"user": "u"}}]},
            "contexts[x].context.cluster: not set",
        ),
        ({"cluster": {"server": None}}, "clusters[c].cluster.server: not set"),
        (
            {"cluster": {"server": "127.0.0.1:6443"}},
            "clusters[c].cluster.server: '127.0.0.1:6443' is not an http(s) URL",
        ),
        (
            {"cluster": {"certificate-authority-data": "%%%"}},
            "clusters[c].cluster.certificate-authority-data: not valid base64",
        ),
        (
            {"cluster": {"certificate-authority-data": _b64(b"hello")}},
            "clusters[c].cluster.certificate-authority-data: not a PEM CA certificate",
        ),
        (
            {
                "cluster": {
                    "certificate-authority-data": None,
                    "certificate-authority": "/nonexistent/ca.crt",
                }
            },
            "clusters[c].cluster.certificate-authority: cannot read /nonexistent/ca.crt",
        ),
        (
            {"cluster": {"insecure-skip-tls-verify": True}},
            "insecure-skip-tls-verify: cannot be combined",
        ),
        ({"user": {"client-key-data": None}}, "users[u].user.client-key(-data): not set"),
        (
            {"user": {"client-key-data": _b64(b"-----BEGIN JUNK-----")}},
            "users[u].user.client-key: not a PEM private key",
        ),
        (
            {"user": {"exec": {"command": "aws"}}},
            "users[u].user.exec: credential plugins are not supported",
        ),
        (
            {"user": {"username": "bob", "password": "pw"}},
            "users[u].user.username: basic authentication is not supported",
        ),
        ({"user": {"tokenFile": "/nonexistent/token"}}, "users[u].user.tokenFile: cannot read"),
        (
            {"cluster": {"server": "http://127.0.0.1:8080"}},
            "users[u].user.client-certificate: needs an https server",
        ),
        ({"users": "oops"}, "users: must be a list"),
    ],
)
def test_kube_client_kubeconfig_errors_name_the_field(
    tmp_path: Path, ca: CertificateAuthority, changes: Obj, message: str
) -> None:
    doc = _kubeconfig(ca, **changes)
    doc = {k: v for k, v in doc.items() if v is not None}
    path = tmp_path / "bad.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(KubeconfigError) as info:
        load_kubeconfig(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_kube_client_kubeconfig_mismatched_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = ca.issue_client_cert(ADMIN)
    path = tmp_path / "k"
    path.write_text(
        yaml.safe_dump(_kubeconfig(ca, user={"client-key-data": _b64(other.key_pem())}))
    )
    with pytest.raises(KubeconfigError, match="client certificate and key are unusable together"):
        load_kubeconfig(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("a: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "not a kubeconfig"),
    ],
)
def test_kube_client_kubeconfig_unreadable(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "kc"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KubeconfigError, match=message):
        load_kubeconfig(path)


# ---- informer cache -------------------------------------------------------------------------


def _pod(name: str, rv: int, ns: str = "default") -> Obj:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv)}}


def test_kube_client_informer_relist_emits_the_diff() -> None:
    informer = Informer(KubeClient("http://127.0.0.1:9"), PODS)
    seen: list[Change] = []
    informer.add_listener(seen.append)
    first = informer.replace([_pod("a", 1), _pod("b", 2), _pod("c", 3, "kube-system")], "3")
    assert [(c.type, c.key, c.relisted) for c in first] == [
        ("ADDED", ("default", "a"), True),
        ("ADDED", ("default", "b"), True),
        ("ADDED", ("kube-system", "c"), True),
    ]
    assert informer.synced and len(informer) == 3
    later = informer.replace([_pod("a", 7), _pod("c", 3, "kube-system"), _pod("d", 8)], "9")
    assert [(c.type, c.key) for c in later] == [
        ("MODIFIED", ("default", "a")),
        ("DELETED", ("default", "b")),
        ("ADDED", ("default", "d")),
    ]
    deleted = later[1]
    assert deleted.object == _pod("b", 2) and deleted.old == _pod("b", 2)
    assert later[0].old == _pod("a", 1)
    assert seen == first + later
    assert informer.resource_version == "9"
    assert [o["metadata"]["name"] for o in informer.items()] == ["a", "d", "c"]
    assert [o["metadata"]["name"] for o in informer.items("default")] == ["a", "d"]
    assert informer.keys() == [("default", "a"), ("default", "d"), ("kube-system", "c")]
    assert informer.stats.synthesised == 3


def test_kube_client_informer_drops_duplicate_events() -> None:
    informer = Informer(KubeClient("http://127.0.0.1:9"), PODS)
    informer.replace([_pod("a", 1)], "1")
    assert informer.apply(WatchEvent("ADDED", _pod("a", 1))) is None  # replayed
    changed = informer.apply(WatchEvent("ADDED", _pod("a", 4)))  # ADDED of a known object
    assert changed is not None and changed.type == "MODIFIED" and changed.old == _pod("a", 1)
    assert informer.apply(WatchEvent("MODIFIED", _pod("a", 4))) is None
    assert informer.apply(WatchEvent("DELETED", _pod("zz", 5))) is None  # never seen
    fresh = informer.apply(WatchEvent("MODIFIED", _pod("b", 6)))  # first sight: ADDED
    assert fresh is not None and fresh.type == "ADDED"
    assert informer.apply(WatchEvent("BOOKMARK", {"metadata": {"resourceVersion": "12"}})) is None
    assert informer.resource_version == "12"
    assert informer.has_seen("12") and informer.has_seen("6") and not informer.has_seen("13")
    gone = informer.apply(WatchEvent("DELETED", _pod("a", 13)))
    assert gone is not None and gone.type == "DELETED" and informer.get("a", "default") is None
    assert informer.stats.duplicates == 3
    cluster = Informer(KubeClient("http://127.0.0.1:9"), NODES)
    cluster.replace([{"metadata": {"name": "n1", "resourceVersion": "1"}}], "1")
    assert cluster.get("n1") is not None and cluster.get("n1", "ignored") is not None
