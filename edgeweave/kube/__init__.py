"""The Kubernetes-compatible object store behind cloudcore's embedded API and edgecore's MetaServer.

- `resources`: the served resources (names, scope, subresources, verbs) and discovery documents.
- `store`: the SQLite store: one global revision as resourceVersion, list/watch, compaction.
- `objects`: object semantics without storage (validation, defaults, generation, deletion).
- `selectors`: label and field selectors (parse, print, match); `sqlfilter` compiles them to SQL.
- `patch`: JSON merge patch, JSON patch, strategic merge patch (`mergekeys` holds the merge keys).
- `errors`: typed errors carrying the Kubernetes `Status` reason and code.

Nothing here does network I/O or uses asyncio; the HTTP server is built on top.
"""
