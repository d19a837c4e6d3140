"""Reconcile our rules with the catalog, idempotently, and remove them all on stop.

`sync(catalog)` reads the tables (one `iptables-save`), plans (pure, `document.plan_sync`) and
applies one `iptables-restore --noflush` transaction only when something differs, then makes
sure the policy routing for TPROXY exists exactly once. Re-applying the same catalog runs only
the reads.
`remove()` deletes the jumps, our chains, the `ip rule` and the route: nothing stays behind.
With iptables-nft, creating our chains creates the whole `mangle`/`filter` table when the host
had none; `remove()` deletes such a table again if it is still empty (no rule, no other chain),
so `iptables-save` reads as before. Tables that existed before this manager's first sync are
never deleted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from edgeweave.log import event
from meshd.catalog import Catalog
from meshd.rules.backend import RuleBackend, RuleError
from meshd.rules.document import (
    TABLES,
    RulesConfig,
    SavedTable,
    SaveParseError,
    build_ruleset,
    fwmark_rule_args,
    fwmark_rules,
    has_local_route,
    is_empty,
    local_route_args,
    parse_save,
    plan_remove,
    plan_sync,
    table_in_sync,
)

log = logging.getLogger("meshd.rules")


class RuleManager:
    """Our iptables chains and TPROXY policy routing on one host (or one namespace)."""

    def __init__(self, backend: RuleBackend, config: RulesConfig | None = None, *,
                 proxy_port: int = 40001) -> None:
        self.backend = backend
        self.config = config or RulesConfig()
        self.proxy_port = proxy_port
        self.resyncs = 0
        """Restores applied (a changed catalog, or rules someone else moved)."""
        self.checks = 0
        """Syncs run, changed or not."""
        self._created: set[str] | None = None  # tables absent before our first sync

    def _saved(self) -> dict[str, SavedTable]:
        text = self.backend.save()
        try:
            return {table: parse_save(text, table) for table in TABLES}
        except SaveParseError as exc:
            raise RuleError(f"iptables-save: {exc}") from None

    def _json(self, *args: str) -> list[Mapping[str, Any]]:
        text = self.backend.ip("-j", *args)
        try:
            data = json.loads(text or "[]")
        except json.JSONDecodeError as exc:
            raise RuleError(f"ip -j {' '.join(args)}: unreadable output: {exc}") from None
        if not isinstance(data, list):
            raise RuleError(f"ip -j {' '.join(args)}: expected a list")
        return [d for d in data if isinstance(d, dict)]

    def _local_routes(self) -> list[Mapping[str, Any]]:
        return self._json("-4", "route", "show", "table", "all", "type", "local", "dev", "lo")

    def sync(self, catalog: Catalog) -> bool:
        """Make the rules match `catalog`; True when something had to change."""
        self.checks += 1
        desired = build_ruleset(catalog, self.proxy_port, self.config)
        saved = self._saved()
        if self._created is None:
            self._created = {t for t in TABLES if not saved[t].present}
        document = plan_sync(desired, saved)
        changed = False
        if document is not None:
            self.backend.restore(document)
            self.resyncs += 1
            changed = True
            event(log, logging.INFO, "rules.sync", backend=self.backend.name,
                  revision=catalog.revision, services=len(catalog.services))
        count = fwmark_rules(self._json("rule", "show"), self.config)
        for _ in range(count - 1):
            self.backend.ip("rule", "del", *fwmark_rule_args(self.config))
        if count == 0:
            self.backend.ip("rule", "add", *fwmark_rule_args(self.config))
            changed = True
        if not has_local_route(self._local_routes(), self.config):
            self.backend.ip("route", "replace", *local_route_args(self.config))
            changed = True
        return changed

    def installed(self, catalog: Catalog) -> bool:
        """Whether the rules for `catalog` are in place now (for `meshd status`)."""
        desired = build_ruleset(catalog, self.proxy_port, self.config)
        saved = self._saved()
        return (all(table_in_sync(desired, saved[t], t) for t in TABLES)
                and fwmark_rules(self._json("rule", "show"), self.config) == 1
                and has_local_route(self._local_routes(), self.config))

    def remove(self) -> None:
        """Delete our jumps, chains, ip rule and route (what an agent stop must leave)."""
        document = plan_remove(self._saved())
        if document is not None:
            self.backend.restore(document)
        for _ in range(fwmark_rules(self._json("rule", "show"), self.config)):
            self.backend.ip("rule", "del", *fwmark_rule_args(self.config))
        if has_local_route(self._local_routes(), self.config):
            self.backend.ip("route", "del", *local_route_args(self.config))
        if self._created:
            saved = self._saved()
            for table in sorted(self._created):
                if saved[table].present and is_empty(saved[table]):
                    self.backend.delete_table(table)
        event(log, logging.INFO, "rules.remove", backend=self.backend.name)
