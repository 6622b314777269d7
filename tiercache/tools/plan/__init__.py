"""`tiercache plan`: how much KV each tier holds for a model, and what a trace would hit.

- model.py    the model's KV shape from a config.json (Llama, Qwen2, GPT-2, MLA) or given numbers
- sizing.py   bytes per token / block, blocks, tokens and full-length sequences per tier
- probe.py    bandwidth per tier on this machine (TierCache itself), or from a results file
- replay.py   a request trace through the runtime's policies at those sizes (blocks, not bytes)
- command.py  the command line and its text / JSON output
"""

from __future__ import annotations

from tiercache.tools.plan.command import build_parser, main, make_plan, render
from tiercache.tools.plan.model import ModelShape, load_model_shape, shape_from_config
from tiercache.tools.plan.replay import ReplayResult, TierReplay, block_keys, read_trace, unbounded_hit_rate
from tiercache.tools.plan.sizing import TierSize, disk_block_cost, size_tiers

__all__ = ["main", "build_parser", "make_plan", "render", "ModelShape", "load_model_shape", "shape_from_config",
           "TierReplay", "ReplayResult", "block_keys", "read_trace", "unbounded_hit_rate", "TierSize",
           "disk_block_cost", "size_tiers"]
