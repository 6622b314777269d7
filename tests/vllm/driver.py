"""Run one vLLM engine over a script of prompts, in its own process, and write what happened as JSON.

    python tests/vllm/driver.py SPEC.json OUT.json

SPEC: {"model": dir, "extra": {...} | null (no connector), "multiprocess": bool,
       "llm": {LLM kwargs}, "phases": [{"prompts": [[ids]], "salts": [str|null] | null,
       "max_tokens": int, "reset_prefix_cache": bool}]}
       "flush": bool (in-process: wait for the connector's saves after the phase)
OUT:  {"phases": [{"outputs": [[ids]], "finish": [reason], "metrics": {name: value}}],
       "connector": {counter: value} (in-process runs with the connector)}

A fresh process per engine: vLLM keeps process-wide state, and the tests need a cold vLLM
prefix cache in a second process over the same tiercache store.
"""

from __future__ import annotations

import json
import os
import sys


def kv_transfer_config(extra: dict) -> dict:
    return {"kv_connector": "TierCacheConnector", "kv_connector_module_path": "tiercache.integrations.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": extra}


def metrics(llm) -> dict:
    """Counters and gauges by name, labels other than model and engine appended as JSON."""
    out: dict = {}
    for m in llm.get_metrics():
        value = getattr(m, "value", None)
        if isinstance(value, (int, float)):
            labels = {k: v for k, v in (m.labels or {}).items() if k not in ("model_name", "engine")}
            key = m.name + (json.dumps(labels, sort_keys=True) if labels else "")
            out[key] = out.get(key, 0) + value
    # vLLM's reader lists only vllm:* names; the connector's tiercache_* counters are read from the registry
    # the front end's Prometheus logger registered them in (this process, in both modes).
    from prometheus_client import REGISTRY
    for family in REGISTRY.collect():
        if family.name.startswith("tiercache_") and family.type == "counter":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
                    key = family.name + (json.dumps(labels, sort_keys=True) if labels else "")
                    out[key] = out.get(key, 0) + sample.value
    return out


def _connector():
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    return get_kv_transfer_group()


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("multiprocess") else "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs = dict(model=spec["model"], enforce_eager=True, dtype="bfloat16", seed=0, disable_log_stats=False,
                  max_model_len=4096, gpu_memory_utilization=0.3)  # on CPU: the share of RAM vLLM may claim
    kwargs.update(spec.get("llm", {}))
    if spec.get("extra") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(**kv_transfer_config(spec["extra"]))
    llm = LLM(**kwargs)
    result: dict = {"phases": []}
    for phase in spec["phases"]:
        if phase.get("reset_prefix_cache"):
            llm.reset_prefix_cache()
        salts = phase.get("salts") or [None] * len(phase["prompts"])
        prompts = [{"prompt_token_ids": p, **({"cache_salt": s} if s is not None else {})}
                   for p, s in zip(phase["prompts"], salts)]
        params = SamplingParams(temperature=0.0, max_tokens=phase.get("max_tokens", 8), ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        if phase.get("flush"):
            _connector().worker.flush()  # in-process only: the saves reach the disk before the next phase
        result["phases"].append({"outputs": [list(o.outputs[0].token_ids) for o in outs],
                                 "finish": [o.outputs[0].finish_reason for o in outs],
                                 "metrics": metrics(llm)})
    if spec.get("extra") is not None and not spec.get("multiprocess"):
        result["connector"] = dict(_connector().worker.counters)
    with open(out_path, "w") as f:
        json.dump(result, f)
    del llm


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
