"""tiercache's connector under a real vLLM (CPU backend): outputs, hits, faults, preemption, salts.

Each engine runs in its own process (driver.py). The reference for every prompt is vLLM alone
with prefix caching off (`reference`): with the connector, outputs must be identical whether KV
came from tiercache, from vLLM's own cache, or was recomputed after a failed load.
"""

from __future__ import annotations

import lmdb
import pytest

from .conftest import PROMPTS, phase

pytest.importorskip("vllm")

HITS = "vllm:external_prefix_cache_hits"
QUERIES = "vllm:external_prefix_cache_queries"
DISK_HITS = 'vllm:prompt_tokens_cached_by_source{"source": "disk"}'
HOST_HITS = 'vllm:prompt_tokens_cached_by_source{"source": "host"}'


def tc_hits(metrics: dict, tier: str) -> float:
    """tiercache_hit_tokens_total{tier}: the connector's own count, carried to the front end by vLLM."""
    return metrics[f'tiercache_hit_tokens{{"tier": "{tier}"}}']


def store_cfg(path) -> dict:
    return {"disk_path": str(path), "disk_bytes": "1GiB", "host_bytes": "64MiB"}


def assert_same(result: dict, phases_names: list[list[str]], reference: dict) -> None:
    for names, ph in zip(phases_names, result["phases"]):
        assert ph["finish"] == ["length"] * len(names), f"a request ended early or in error: {ph['finish']}"
        for name, got in zip(names, ph["outputs"]):
            assert got == reference[name], f"prompt {name!r}: output differs from vLLM alone"


def test_outputs_identical_and_hits_in_process(run_engine, reference, tmp_path):
    names = [["q1"], ["q2"], ["q3"]]
    r = run_engine([phase(["q1"], flush=True), phase(["q2"], reset_prefix_cache=True, flush=True),
                    phase(["q3"], reset_prefix_cache=True)], extra=store_cfg(tmp_path / "store"))
    assert_same(r, names, reference())
    hits = [ph["metrics"][HITS] for ph in r["phases"]]
    # Nothing stored before q1; with vLLM's own cache reset, q2 gets the document's 7 full blocks from
    # tiercache and q3 the 5 it shares with q1.
    assert hits == [0, 7 * 128, (7 + 5) * 128]
    # the worker's host memory held every block: the scheduler's decision layer offered them from there
    assert r["phases"][-1]["metrics"][HOST_HITS] == hits[-1]
    assert r["phases"][-1]["metrics"].get(DISK_HITS, 0) == 0
    c = r["connector"]
    assert c["loaded_tokens"] == hits[-1] and c["failed_blocks"] == 0 and c["saved_tokens"] > 0
    m = r["phases"][-1]["metrics"]
    # the worker still held q1's blocks in host memory: served from there, not from disk
    assert tc_hits(m, "host") == hits[-1] and tc_hits(m, "disk") == 0
    # new full blocks only (prompt and generated tokens): q1 1158 tokens -> 9; q2 1208 -> 9, 7 were hits;
    # q3 948 -> 7, 5 were hits
    assert m["tiercache_stored_tokens"] == (9 + 2 + 2) * 128 and m["tiercache_recomputed_blocks"] == 0


def test_second_process_gets_the_prefix_from_tiercache(run_engine, reference, tmp_path):
    """Multiprocess mode (what `vllm serve` runs): scheduler, worker and front end are separate processes."""
    cfg = store_cfg(tmp_path / "store")
    first = run_engine([phase(["q1"]), phase(["long"])], extra=cfg, multiprocess=True)
    second = run_engine([phase(["q2"]), phase(["long"])], extra=cfg, multiprocess=True)
    assert_same(first, [["q1"], ["long"]], reference())
    assert_same(second, [["q2"], ["long"]], reference())
    assert first["phases"][-1]["metrics"][HITS] == 0
    m = second["phases"][-1]["metrics"]
    assert m["vllm:prefix_cache_hits"] == 0      # vLLM's own cache is cold in the new process
    # q2 shares DOC's 7 blocks with q1; long's 11 full blocks were all stored.
    assert m[HITS] == (7 + 11) * 128
    assert m[DISK_HITS] == m[HITS]
    assert tc_hits(m, "disk") == m[HITS]         # a new worker's host memory is empty: all from disk
    # the same, loaded in the background (the request waits, not scheduled, until the worker reports it)
    third = run_engine([phase(["q2"])], extra={**cfg, "async_load_bytes": 0}, multiprocess=True)
    assert_same(third, [["q2"]], reference())
    assert third["phases"][-1]["metrics"][HITS] == 9 * 128   # q2's own 9 prompt blocks: the second engine stored them


def _damage_every_other_frame(path) -> int:
    env = lmdb.open(str(path), max_dbs=16, subdir=True)
    db = env.open_db(b"blocks", create=False)
    damaged = 0
    with env.begin(write=True, db=db) as txn:
        for i, (key, frame) in enumerate(list(txn.cursor())):
            if i % 2 == 0:
                frame = bytearray(frame)
                frame[len(frame) // 2] ^= 0x10
                txn.put(key, bytes(frame))
                damaged += 1
    env.close()
    return damaged


def test_corrupted_store_gives_identical_outputs_and_no_errors(run_engine, reference, tmp_path):
    cfg = store_cfg(tmp_path / "store")
    run_engine([phase(["q1"]), phase(["long"], flush=True)], extra=cfg)
    assert _damage_every_other_frame(tmp_path / "store") > 0
    r = run_engine([phase(["q1"]), phase(["long"])], extra=cfg)
    assert_same(r, [["q1"], ["long"]], reference())
    m, c = r["phases"][-1]["metrics"], r["connector"]
    assert m[HITS] > 0                           # the index still offered the blocks ...
    assert c["failed_blocks"] > 0                # ... the worker found them corrupt, vLLM recomputed them
    assert c["loaded_tokens"] + c["failed_blocks"] * 128 == m[HITS]
    assert m["tiercache_recomputed_blocks"] == c["failed_blocks"]


def test_chunked_prefill_salts_and_preemption(run_engine, reference, tmp_path):
    """float32: three requests share each step here, and bf16 greedy outputs can flip with the batch's shapes."""
    # 16 usable blocks of KV (one is the null block) for three requests growing to 6 blocks each: preemption.
    # Chunks of 256 tokens: every prompt is prefilled over several steps.
    llm = {"num_gpu_blocks_override": 17, "max_model_len": 2048, "max_num_batched_tokens": 256, "max_num_seqs": 4,
           "dtype": "float32"}
    names = [["long"], ["long"], ["long"], ["p0", "p1", "p2"]]
    r = run_engine([phase(["long"], salts=["tenant-a"], flush=True),
                    phase(["long"], salts=["tenant-b"], reset_prefix_cache=True, flush=True),
                    phase(["long"], salts=["tenant-a"], reset_prefix_cache=True, flush=True),
                    phase(["p0", "p1", "p2"], reset_prefix_cache=True)],
                   extra=store_cfg(tmp_path / "store"), llm=llm)
    assert_same(r, names, reference("float32"))
    hits = [ph["metrics"][HITS] for ph in r["phases"]]
    assert hits[0] == 0
    assert hits[1] == 0                          # tenant-b never sees tenant-a's KV
    assert hits[2] == 11 * 128                   # tenant-a gets its own back (metrics are cumulative)
    assert r["phases"][3]["metrics"]["vllm:num_preemptions"] > 0
    assert r["connector"]["failed_blocks"] == 0
    assert len(PROMPTS["long"]) > llm["max_num_batched_tokens"]
