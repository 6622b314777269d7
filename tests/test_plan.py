"""`tiercache plan`: sizes of real model configs against hand-computed figures, and the trace replay against
an actual run of the same trace through TierCache (lookup_by_tier, then store, per request)."""

from __future__ import annotations

import json

import pytest
import torch

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.policy import EVICTION_POLICIES
from tiercache.tools.plan import (
    ModelShape,
    TierReplay,
    disk_block_cost,
    load_model_shape,
    main,
    shape_from_config,
    size_tiers,
    unbounded_hit_rate,
)
from tiercache.tools.plan.replay import read_trace
from tiercache.tools.workload import make_rag_workload, write_jsonl

GiB = 2**30

# the fields that matter, as the published config.json files spell them
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "torch_dtype": "bfloat16", "vocab_size": 128256}
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
            "torch_dtype": "bfloat16", "vocab_size": 152064}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
        "vocab_size": 50257}
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "num_hidden_layers": 61,
               "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
               "max_position_embeddings": 163840, "torch_dtype": "bfloat16"}


def test_llama3_8b_from_a_model_directory(tmp_path):
    (tmp_path / "Meta-Llama-3-8B").mkdir()
    (tmp_path / "Meta-Llama-3-8B" / "config.json").write_text(json.dumps(LLAMA3_8B))
    shape = load_model_shape(str(tmp_path / "Meta-Llama-3-8B"))
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.dtype) == (32, 8, 128, "bfloat16")
    # 32 layers x 2 (K, V) x 8 heads x 128 dims x 2 bytes
    assert shape.bytes_per_token == 131072 and shape.block_bytes(16) == 2 * 2**20
    gpu, host, disk = size_tiers(shape, 16, {"device": 10 * GiB, "host": 64 * GiB, "disk": 500 * GiB}, 1.0)
    assert (gpu.blocks, gpu.tokens, gpu.sequences) == (5120, 81920, 10)       # 10 GiB / 2 MiB; 81920 / 8192
    assert (host.blocks, host.tokens, host.sequences) == (32768, 524288, 64)
    # disk, uncompressed: frame = 2 MiB + 576 header bytes -> 513 pages of 4 KiB + 256 bytes of index
    assert disk_block_cost(shape, 16, 1.0) == 513 * 4096 + 256 == 2101504
    # blocks are charged against 85% of disk_bytes (the rest is LMDB's copy-on-write room)
    assert disk.blocks == int(500 * GiB * 0.85) // 2101504 == 217149 and disk.sequences == 217149 * 16 // 8192 == 424
    # at 1.45x the frame is 1446312 + 576 bytes -> 354 pages
    assert disk_block_cost(shape, 16, 1.45) == 354 * 4096 + 256


def test_qwen2_7b_gqa_from_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**QWEN2_7B, "_name_or_path": "Qwen/Qwen2-7B"}))
    shape = load_model_shape(str(path))
    assert shape.name == "Qwen2-7B"
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (28, 4, 128)  # 3584 / 28 heads
    assert shape.bytes_per_token == 28 * 2 * 4 * 128 * 2 == 57344
    (gpu,) = size_tiers(shape, 16, {"device": 8 * GiB})
    assert gpu.bytes_per_block == 917504
    assert gpu.blocks == 9362 and gpu.tokens == 149792 and gpu.sequences == 4     # 149792 // 32768


def test_gpt2_fp32_without_kv_heads_or_head_dim():
    shape = shape_from_config(GPT2, name="gpt2")
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.dtype) == (12, 12, 64, "bfloat16")
    shape = shape_from_config(GPT2, name="gpt2", dtype="float32")
    assert shape.bytes_per_token == 12 * 2 * 12 * 64 * 4 == 73728 and shape.max_seq_len == 1024
    (host,) = size_tiers(shape, 16, {"host": GiB})
    assert host.blocks == 910 and host.tokens == 14560 and host.sequences == 14


def test_sliding_window_is_flagged(capsys, tmp_path):
    mistral = {**LLAMA3_8B, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert shape_from_config(mistral).sliding_window == 4096
    assert shape_from_config({**mistral, "use_sliding_window": False}).sliding_window is None  # Qwen2 spelling
    assert shape_from_config(QWEN2_7B).sliding_window is None
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    assert main(["--model", str(tmp_path), "--host", "1GiB", "--no-probe"]) == 0
    assert "sliding-window attention (4096 tokens)" in capsys.readouterr().out


def test_mla_latent_is_one_plane():
    shape = shape_from_config(DEEPSEEK_V3, name="DeepSeek-V3")
    assert (shape.planes, shape.num_kv_heads, shape.head_dim) == (1, 1, 576)
    assert shape.bytes_per_token == 61 * 576 * 2 == 70272


@pytest.mark.parametrize("cfg,field", [
    ({"num_attention_heads": 8, "hidden_size": 512}, "num_hidden_layers or n_layer or num_layers"),
    ({"num_hidden_layers": 2, "num_attention_heads": 6, "hidden_size": 512}, "not a multiple"),
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "torch_dtype": "int4"}, "int4"),
    ({"num_hidden_layers": -1, "num_attention_heads": 8, "hidden_size": 512}, "num_hidden_layers must be"),
])
def test_bad_configs_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        shape_from_config(cfg)


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--host", "1GiB", "--no-probe"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--layers", "2", "--host", "1GiB", "--no-probe"])
    assert e.value.code == 2
    assert "--kv-heads, --head-dim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--no-probe"])
    assert "at least one budget" in capsys.readouterr().err


def test_cli_json_with_given_prefill_rate(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    argv = ["--model", str(path), "--gpu-kv", "10GiB", "--host", "64GiB", "--no-probe", "--prefill-rate", "4096",
            "--prefix", "8192", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["kv_bytes_per_token"] == 131072 and plan["prefix_bytes"] == 8192 * 131072
    tiers = {r["tier"]: r for r in plan["tiers"]}
    assert tiers["device"]["tokens"] == 81920 and tiers["host"]["tokens"] == 524288
    assert tiers["host"]["recompute_prefix_s"] == pytest.approx(2.0)      # 8192 tokens at 4096 tokens/s
    assert tiers["host"]["gb_per_s"] is None and tiers["host"]["load_prefix_s"] is None  # --no-probe: unknown


def test_bandwidth_from_a_bench_results_file(tmp_path, capsys):
    bench = {"machine": {"name": "box"}, "throughput": [{"row": "host load", "median": 10.0},
                                                        {"row": "disk load, cold", "median": 1.0}],
             "footprint": [{"data": "realistic bf16", "frame_ratio": 0.5}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    argv = ["--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--host", "64GiB", "--disk", "100GiB",
            "--bandwidth-from", str(tmp_path / "bench.json"), "--prefix", "10000", "--prefill-rate", "1000",
            "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    tiers = {r["tier"]: r for r in plan["tiers"]}
    nbytes = 10000 * 131072
    assert tiers["host"]["load_prefix_s"] == pytest.approx(nbytes / 10e9)
    assert tiers["disk"]["load_prefix_s"] == pytest.approx(nbytes / 1e9)
    assert tiers["disk"]["load_vs_recompute"] == pytest.approx(10.0 / (nbytes / 1e9))
    assert plan["disk_ratio"] == 2.0 and plan["disk_block_cost"] == disk_block_cost(
        ModelShape("m", 32, 8, 128), 16, 2.0)


def test_probe_measures_every_tier_with_the_real_cache(capsys):
    argv = ["--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--host", "16MiB", "--disk", "1GiB",
            "--probe-bytes", "2MiB", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    bw = plan["bandwidth"]
    assert bw["source"] == "probe" and bw["host"] > 0 and bw["disk"] > 0
    # sized at what compression="auto" chose for this layout on this machine: the byte-plane codec
    # compresses bf16 KV; uncompressed frames cost their raw bytes plus a header
    assert plan["disk_ratio_source"] == "measured" and bw["disk_codec"] in ("byteplane", "none")
    if bw["disk_codec"] == "byteplane":
        assert plan["disk_ratio"] > 1.0
    else:
        assert 0.98 < plan["disk_ratio"] <= 1.0


# -- the replay against TierCache ------------------------------------------------------------------
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, block_size=16)  # 512-byte blocks


def small_trace() -> list[list[int]]:
    w = make_rag_workload(seed=3, num_documents=6, questions_per_document=3, document_tokens=96, system_tokens=32)
    return [list(r.token_ids) for r in w.requests]


def disk_bytes_for(blocks: int, tmp_path) -> int:
    """disk_bytes that hold exactly `blocks` uncompressed frames, from what the cache charges for 1 and 2 blocks
    (the first block also pays for the store's fixed rows, e.g. its namespace)."""
    used = []
    for n in (1, 2):
        cfg = CacheConfig(layout=LAYOUT, host_bytes=0, disk_path=str(tmp_path / f"probe{n}"), disk_bytes="1MiB",
                          compression="none")
        with TierCache(cfg) as cache:
            cache.store(list(range(16 * n)), torch.zeros(LAYOUT.kv_shape(16 * n), dtype=LAYOUT.dtype))
            cache.flush()
            used.append(cache.stats()["used_bytes"]["disk"])
    per_block = used[1] - used[0]
    assert per_block > LAYOUT.block_bytes
    return used[0] + (blocks - 1) * per_block + per_block // 2


def run_tiercache(trace, tmp_path, device_blocks, host_blocks, disk_blocks, load=False,
                  **cfg_kw) -> list[dict[str, int]]:
    cfg = CacheConfig(layout=LAYOUT, device="cpu", device_bytes=device_blocks * LAYOUT.block_bytes,
                      host_bytes=host_blocks * LAYOUT.block_bytes, disk_path=str(tmp_path / "lmdb"),
                      disk_bytes=disk_bytes_for(disk_blocks, tmp_path), compression="none", **cfg_kw)
    g = torch.Generator().manual_seed(0)
    out = []
    with TierCache(cfg) as cache:
        for tokens in trace:
            by_tier = cache.lookup_by_tier(tokens)
            out.append({t: by_tier.get(t, 0) for t in ("device", "host", "disk")})
            kv = torch.randn(LAYOUT.kv_shape(len(tokens)), generator=g).to(LAYOUT.dtype)
            n = sum(by_tier.values())
            if load:  # as TierCachedLM: load the cached prefix, store only if the prompt has new full blocks
                if n:
                    assert cache.load(tokens[:n]).shape[2] == n
                    cache.flush()  # second-hit admission queues disk writes at load; their host slots are
                    # pinned until written, so the store below would otherwise race the write-behind
                if len(tokens) // 16 * 16 > n:
                    cache.store(tokens, kv)
            else:
                cache.store(tokens, kv)
            # the replay writes the disk at once; the cache writes it on a background thread: wait for it
            cache.flush()
    return out


@pytest.mark.parametrize("eviction", sorted(EVICTION_POLICIES))
@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
@pytest.mark.parametrize("load", [False, True], ids=["lookup+store", "lookup+load+store"])
@pytest.mark.parametrize("admission", ["all", "second_hit"])
def test_replay_matches_tiercache_hit_for_hit(tmp_path, eviction, write_policy, load, admission):
    """The same trace through TierCache (public API; `flush()` after each request, since the replay writes the
    disk at once) and through the replay: the same hit tokens per tier on every request."""
    trace = small_trace()
    sizes = {"device_blocks": 4, "host_blocks": 12, "disk_blocks": 24}  # prompts are 11-13 blocks
    sim = TierReplay(16, eviction=eviction, write_policy=write_policy, admission=admission, load=load, **sizes)
    result = sim.run(trace)
    # the sizes are small enough that every tier evicts: the comparison exercises the policies
    assert all(result.evictions[t] > 0 for t in ("device", "host", "disk")), result.evictions
    assert all(result.hit_tokens[t] > 0 for t in ("device", "host", "disk")), result.hit_tokens
    actual = run_tiercache(trace, tmp_path, eviction=eviction, write_policy=write_policy, admission=admission,
                           load=load, **sizes)
    assert result.per_request == actual
    assert result.lookup_tokens == sum(len(t) for t in trace)


def test_unbounded_hit_rate_is_the_structural_sharing():
    trace = [[1] * 40, [1] * 40 + [2] * 20, [3] * 16]
    # request 2 shares the 2 full blocks (32 tokens) of request 1; nothing else is shared
    assert unbounded_hit_rate(trace, 16) == pytest.approx(32 / (40 + 60 + 16))
    sim = TierReplay(16, host_blocks=100).run(trace)
    assert sim.hit_tokens == {"device": 0, "host": 32, "disk": 0}


def test_trace_file_from_the_workload_generator_and_the_cli(tmp_path, capsys):
    w = make_rag_workload(seed=1, num_documents=3, questions_per_document=2, document_tokens=96, system_tokens=32)
    path = tmp_path / "trace.jsonl"
    write_jsonl(w, str(path))
    assert read_trace(str(path)) == [list(r.token_ids) for r in w.requests]
    argv = ["--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--host", "4KiB", "--disk", "1MiB",
            "--no-probe", "--trace", str(path), "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    rp = plan["replay"]
    assert rp["requests"] == 6 and rp["blocks"]["host"] == 8     # 4 KiB / 512-byte blocks
    expect = TierReplay(16, host_blocks=8, disk_blocks=rp["blocks"]["disk"]).run(read_trace(str(path)))
    assert rp["hit_tokens"] == expect.hit_tokens and rp["hit_tokens_total"] > 0
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "trace replay" in text and "hit rate" in text


@pytest.mark.parametrize("line", ['{"text": "hello"}', "[1, 2, 1.5]", "not json"])
def test_bad_trace_lines_are_named(tmp_path, line):
    path = tmp_path / "t.jsonl"
    path.write_text("[1, 2, 3]\n" + line + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_trace(str(path))


def test_measure_prefill_on_a_config_only_model_directory(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
           "max_position_embeddings": 512, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    argv = ["--model", str(tmp_path), "--host", "1MiB", "--no-probe", "--measure-prefill", "--prefix", "64", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    rate = plan["prefill"]["tokens_per_s"]
    assert rate > 0 and "measured" in plan["prefill"]["source"]
    assert plan["tiers"][0]["recompute_prefix_s"] == pytest.approx(64 / rate)
    assert plan["model"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers x K,V x kv heads x head dim x fp32


def test_measure_prefill_on_an_unavailable_device_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    argv = ["--model", str(tmp_path), "--host", "1GiB", "--no-probe", "--measure-prefill", "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda: CUDA is not available" in err[0]


def test_bandwidth_from_an_earlier_plan(tmp_path, capsys):
    earlier = {"bandwidth": {"source": "probe", "host": 5.0, "disk": 0.5, "disk_ratio": 1.25}}
    (tmp_path / "plan.json").write_text(json.dumps(earlier))
    argv = ["--layers", "1", "--kv-heads", "1", "--head-dim", "64", "--host", "1GiB", "--disk", "1GiB",
            "--bandwidth-from", str(tmp_path / "plan.json"), "--prefix", "1000", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    tiers = {r["tier"]: r for r in plan["tiers"]}
    assert tiers["host"]["load_prefix_s"] == pytest.approx(1000 * 256 / 5e9)
    assert plan["disk_ratio"] == 1.25 and plan["bandwidth"]["source"].endswith("(plan)")
    (tmp_path / "other.json").write_text(json.dumps({"throughput": []}))
    assert main([*argv[:-5], "--bandwidth-from", str(tmp_path / "other.json")]) == 2
    assert "neither" in capsys.readouterr().err
