"""iptables rules that steer ClusterIP traffic into the proxy (docs/reference/meshd-proxy.md).

`document` builds the rules from the catalog and plans `iptables-restore --noflush` documents
(pure); `backend` runs the host's tools (`RuleBackend` and the nft/legacy detection); `fake` is
the in-memory backend for unit tests; `manager.RuleManager` reconciles and removes.
"""

from meshd.rules.backend import IptablesBackend, RuleBackend, RuleError, detect_variant
from meshd.rules.document import RulesConfig, Ruleset, build_ruleset
from meshd.rules.manager import RuleManager

__all__ = ["IptablesBackend", "RuleBackend", "RuleError", "RuleManager", "RulesConfig",
           "Ruleset", "build_ruleset", "detect_variant"]
