"""Selectors compiled to SQL agree with the Python matchers; list and watch agree with each other.

For random objects, random changes and random selectors:
- `list_objects` returns exactly what `LabelSelector.matches` / `FieldSelector.matches` accept,
  now and at every earlier revision (the snapshot path);
- replaying the filtered watch stream from the namespace's creation rebuilds the filtered list.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.kube.resources import NAMESPACES, PODS
from edgeweave.kube.selectors import (
    FieldOp,
    FieldRequirement,
    FieldSelector,
    LabelOp,
    LabelSelector,
    Requirement,
)
from edgeweave.kube.store import Store, StoreConfig

_counter = itertools.count()
_label_keys = ["app", "n"]
_label_values = ["web", "", "1", "20"]
_LABEL_OPS: list[LabelOp] = ["=", "!=", "in", "notin", "exists", "!", ">", "<"]
_FIELD_OPS: list[FieldOp] = ["=", "!="]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path = tmp_path_factory.mktemp("query") / "kube.db"
    with Store(path, config=StoreConfig(history_keep=0)) as store:
        yield store


@st.composite
def _pods(draw: st.DrawFn) -> dict[str, Any]:
    labels = draw(st.dictionaries(st.sampled_from(_label_keys), st.sampled_from(_label_values)))
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}]}
    node = draw(st.sampled_from(["n1", "n2", None]))
    if node:
        spec["nodeName"] = node
    host = draw(st.sampled_from([True, False, None]))
    if host is not None:
        spec["hostNetwork"] = host
    prio = draw(st.sampled_from([0, 7, None, "null"]))
    if prio is not None:
        spec["priority"] = None if prio == "null" else prio  # JSON null reads as ''
    links = draw(st.sampled_from([True, False, None]))
    if links is not None:
        spec["enableServiceLinks"] = links  # not a selectable field: read from the document
    return {"metadata": {"labels": labels}, "spec": spec}


@st.composite
def _label_selectors(draw: st.DrawFn) -> LabelSelector:
    reqs = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(_label_keys))
        op = draw(st.sampled_from(_LABEL_OPS))
        if op in ("exists", "!"):
            reqs.append(Requirement(key, op))
        elif op in (">", "<"):
            reqs.append(Requirement(key, op, (draw(st.sampled_from(["0", "1", "5", "20"])),)))
        elif op in ("in", "notin"):
            vals = draw(st.sets(st.sampled_from(_label_values), min_size=1, max_size=3))
            reqs.append(Requirement(key, op, tuple(sorted(vals))))
        else:
            reqs.append(Requirement(key, op, (draw(st.sampled_from(_label_values)),)))
    return LabelSelector(tuple(reqs))


_field_domains = {
    "metadata.name": ["p0", "p1", "p9"],
    "spec.nodeName": ["n1", "n2", ""],
    "status.phase": ["Running", "Pending", ""],
    "spec.hostNetwork": ["true", "false", ""],
    "spec.priority": ["0", "7", ""],
    "spec.enableServiceLinks": ["true", "false", ""],
    "spec.missing": ["", "x"],
    "metadata.labels.app": ["web", ""],
}


@st.composite
def _field_selectors(draw: st.DrawFn) -> FieldSelector:
    reqs = []
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(sorted(_field_domains)))
        op = draw(st.sampled_from(_FIELD_OPS))
        reqs.append(FieldRequirement(path, op, draw(st.sampled_from(_field_domains[path]))))
    return FieldSelector(tuple(reqs))


def _expected(
    objs: list[dict[str, Any]], labels: LabelSelector, fields: FieldSelector
) -> list[str]:
    return [o["metadata"]["name"] for o in objs if labels.matches_object(o) and fields.matches(o)]


@settings(max_examples=150, deadline=None)
@given(
    pods=st.lists(_pods(), min_size=1, max_size=6),
    changes=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["relabel", "phase", "delete"]), _pods()),
        max_size=6,
    ),
    labels=_label_selectors(),
    fields=_field_selectors(),
)
def test_sql_filters_match_python_and_watch_replays_the_list(
    shared: Store,
    pods: list[dict[str, Any]],
    changes: list[tuple[int, str, dict[str, Any]]],
    labels: LabelSelector,
    fields: FieldSelector,
) -> None:
    ns = f"q{next(_counter)}"
    start = shared.create(NAMESPACES, {"metadata": {"name": ns}})["metadata"]["resourceVersion"]
    names: list[str] = []
    for i, body in enumerate(pods):
        body["metadata"]["name"] = f"p{i}"
        shared.create(PODS, body, namespace=ns)
        names.append(f"p{i}")
    history: list[tuple[int, list[str]]] = []
    for index, action, body in changes:
        name = f"p{index}"
        if name not in names:
            continue
        if action == "delete":
            shared.delete(PODS, name, namespace=ns)
            names.remove(name)
        elif action == "phase":
            phase = "Running" if index % 2 else "Pending"
            shared.update_status(
                PODS, {"metadata": {"name": name}, "status": {"phase": phase}}, namespace=ns
            )
        else:
            body["metadata"]["name"] = name
            shared.update(PODS, body, namespace=ns)
        current = shared.list_objects(PODS, namespace=ns).objects()
        history.append((shared.revision, _expected(current, labels, fields)))

    everything = shared.list_objects(PODS, namespace=ns).objects()
    got = shared.list_objects(PODS, namespace=ns, label_selector=labels, field_selector=fields)
    assert [o["metadata"]["name"] for o in got.objects()] == _expected(everything, labels, fields)

    for revision, expected in history:  # the same filters over older states
        old = shared.list_objects(
            PODS,
            namespace=ns,
            label_selector=labels,
            field_selector=fields,
            resource_version=revision,
        )
        assert [o["metadata"]["name"] for o in old.objects()] == expected

    visible: dict[str, dict[str, Any]] = {}
    batch = shared.events_since(
        int(start), PODS, namespace=ns, label_selector=labels, field_selector=fields
    )
    for event in batch.events:
        obj = event.object()
        if event.type == "ADDED":
            assert event.name not in visible
            visible[event.name] = obj
        elif event.type == "MODIFIED":
            assert event.name in visible
            visible[event.name] = obj
        else:
            assert visible.pop(event.name)
        # every event shows a matching state (DELETED: the last one that matched)
        assert labels.matches_object(obj) and fields.matches(obj)
    assert sorted(visible) == [o["metadata"]["name"] for o in got.objects()]
    assert [visible[n] for n in sorted(visible)] == got.objects()


def test_label_and_field_columns_survive_updates(tmp_path: Path) -> None:
    with Store(tmp_path / "k.db") as store:
        store.create(
            PODS,
            {"metadata": {"name": "p", "labels": {"a": "1"}}, "spec": {"nodeName": "n1"}},
            namespace="default",
        )
        store.update(
            PODS, {"metadata": {"name": "p"}, "spec": {"nodeName": "n2"}}, namespace="default"
        )
        assert store.list_objects(PODS, label_selector="a").count == 0
        assert store.list_objects(PODS, label_selector="!a").count == 1
        assert store.list_objects(PODS, field_selector="spec.nodeName=n2").count == 1
        assert store.list_objects(PODS, field_selector="spec.nodeName=n1").count == 0


def test_every_field_path_and_value_matches_python(tmp_path: Path) -> None:
    """Exhaustive over a few objects: rows (side column and document), history, snapshot."""
    bodies: list[dict[str, Any]] = [
        {
            "spec": {
                "nodeName": "n1",
                "hostNetwork": True,
                "priority": 0,
                "x": None,
                "enableServiceLinks": False,
            }
        },
        {"spec": {"priority": 7, "enableServiceLinks": True, "x": "s"}},
        {"spec": {"x": 1.5}, "metadata": {"labels": {"app": "web", "n": "20"}}},
        {},
    ]
    domains = dict(_field_domains, **{"spec.x": ["", "s", "1.5", "null"]})
    with Store(tmp_path / "k.db") as store:
        objs = []
        for i, body in enumerate(bodies):
            body = {**body, "metadata": {**body.get("metadata", {}), "name": f"p{i}"}}
            objs.append(store.create(PODS, body, namespace="default"))
        mark = store.revision
        store.create(PODS, {"metadata": {"name": "zz"}}, namespace="default")
        for path, values in sorted(domains.items()):
            for op in _FIELD_OPS:
                for value in values:
                    sel = FieldSelector((FieldRequirement(path, op, value),))
                    want = _expected(objs, LabelSelector(), sel)
                    now = store.list_objects(PODS, namespace="default", field_selector=sel)
                    assert [
                        o["metadata"]["name"]
                        for o in now.objects()
                        if o["metadata"]["name"] != "zz"
                    ] == want, (path, op, value)
                    then = store.list_objects(
                        PODS, namespace="default", field_selector=sel, resource_version=mark
                    )
                    assert [o["metadata"]["name"] for o in then.objects()] == want
                    seen = store.events_since(4, PODS, field_selector=sel).events
                    assert [e.name for e in seen if e.name != "zz"] == want
