"""The series the vLLM connector publishes on vLLM's /metrics (plain data: no vLLM, no torch).

Names follow tiercache's own exporter (`tiercache.metrics`) wherever the meaning is the same, so the
dashboards work from either source; `tiercache_recomputed_blocks_total` exists only under vLLM.
"""

from __future__ import annotations

_ERRORS = "Storage faults turned into misses."
# stats key -> (metric name, documentation, extra labels as (name, value) pairs)
SERIES: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    "lookup_tokens": ("tiercache_lookup_tokens_total", "Prompt tokens looked up in tiercache.", ()),
    **{f"hit_tokens.{t}": ("tiercache_hit_tokens_total", "Prompt tokens loaded from tiercache, by tier.",
                           (("tier", t),)) for t in ("host", "disk", "remote")},
    "stored_tokens": ("tiercache_stored_tokens_total", "Tokens of new full blocks saved to tiercache.", ()),
    "dropped_saves": ("tiercache_dropped_writes_total", "Blocks not saved: the save queue was full.",
                      (("tier", "host"),)),
    "load_errors": ("tiercache_errors_total", _ERRORS, (("tier", "host"), ("op", "load"))),
    "save_errors": ("tiercache_errors_total", _ERRORS, (("tier", "host"), ("op", "store"))),
    "recomputed_blocks": ("tiercache_recomputed_blocks_total",
                          "Blocks a lookup offered that the worker could not serve; vLLM recomputed them.", ()),
}


def series_names() -> set[str]:
    return {name for name, _, _ in SERIES.values()}
