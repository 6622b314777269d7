"""`tiercache bench`: tiercache's tiers next to the bounds that limit them, its peers, and TTFT end to end.

One command, everything measured in the same run (see benchmarks/README.md for the protocol):

- protocol.py  configuration, data (realistic bf16 KV), bounds (memcpy, raw file), rounds and timing
- tiers.py     host and disk tier rows, lookup cost, disk footprint
- peers.py     LMCache, SGLang and file formats, each in its own venv (benchmarks/peers/)
- e2e.py       the demo's RAG workload through the transformers integration: TTFT per tier vs the ideal
- scale.py     lookup and store cost as the store grows to 10^6 blocks
- goals.py     the goals as same-run ratios: PASS, MISS (by how much) or not measured
- report.py    machine, code state, the markdown results file
- command.py   `run` and the command line (`main`)
"""

from __future__ import annotations

from tiercache.tools.bench.command import main, parse_args, run
from tiercache.tools.bench.goals import GOALS, judge
from tiercache.tools.bench.protocol import CHUNK_TOKENS, FULL, QUICK, BenchConfig, realistic_kv, uniform_kv
from tiercache.tools.bench.report import render_markdown
from tiercache.tools.bench.tiers import BOUNDS, LOOKUP_ROWS, ROW_ORDER

__all__ = ["main", "run", "parse_args", "BenchConfig", "QUICK", "FULL", "CHUNK_TOKENS", "realistic_kv",
           "uniform_kv", "GOALS", "judge", "render_markdown", "BOUNDS", "ROW_ORDER", "LOOKUP_ROWS"]
