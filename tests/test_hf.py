"""transformers integration against a real TierCache (host tier + LMDB disk tier in tmp_path).

Models are tiny and randomly initialised from configs (seeded); nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config  # noqa: E402

from tiercache import CacheConfig, TierCache  # noqa: E402
from tiercache.integrations.hf import TierCachedLM, layout_for_model  # noqa: E402

VOCAB = 128
# logits tolerance per dtype: reuse changes how prefill is chunked, hence the rounding, not the math
ATOL = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}


def make_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 KV heads
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "qwen2":  # multi-query attention: one KV head
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, max_position_embeddings=512, **common)
    elif arch == "gpt2":  # multi-head attention, no num_key_value_heads in the config
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        raise AssertionError(arch)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tier_cache(model, path, host_bytes="64MiB", disk=True) -> TierCache:
    cfg = CacheConfig(layout=layout_for_model(model, block_size=16), model_id="tiny", device="cpu",
                      device_bytes=0, host_bytes=host_bytes, disk_path=str(path) if disk else None, disk_bytes="1GiB")
    return TierCache(cfg)


def prompt(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


def assert_greedy_equivalent(ref, got, atol: float) -> None:
    """Same greedy tokens and close logits; a divergence is allowed only where the reference's top-2 are a tie
    within tolerance (then the two runs differ by rounding, not by the KV they used)."""
    steps = len(ref.logits)
    for step in range(steps):
        a, b = ref.logits[step][0].float(), got.logits[step][0].float()
        assert torch.allclose(a, b, atol=atol, rtol=0), f"step {step}: max |dlogit| {(a - b).abs().max():.3g}"
        ta, tb = ref.sequences[0, -steps + step], got.sequences[0, -steps + step]
        if ta != tb:
            assert a[ta] - a[tb] <= 2 * atol, f"step {step}: tokens differ without a near-tie"
            return
    assert torch.equal(ref.sequences, got.sequences)


def gen(target, ids, **kw):
    return target.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("arch,dtype", [
    pytest.param("llama", torch.float32, id="llama-gqa-fp32"),
    pytest.param("llama", torch.bfloat16, id="llama-gqa-bf16"),
    pytest.param("llama", torch.float16, id="llama-gqa-fp16"),
    pytest.param("qwen2", torch.bfloat16, id="qwen2-mqa-bf16"),
    pytest.param("qwen2", torch.float16, id="qwen2-mqa-fp16"),
    pytest.param("gpt2", torch.float32, id="gpt2-mha-fp32"),
])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_reuse_gives_the_same_greedy_output(tmp_path, arch, dtype, layerwise):
    model = make_model(arch, dtype)
    first = prompt(1, 100)
    second = torch.cat([first[:, :70], prompt(2, 30)], dim=1)  # shares 70 tokens: 4 full blocks
    with tier_cache(model, tmp_path) as cache:
        lm = TierCachedLM(model, cache, layerwise=layerwise)
        out = lm.generate(first, max_new_tokens=4)
        assert torch.equal(out, model.generate(first, max_new_tokens=4, do_sample=False))
        assert lm.last_reused_tokens == 0 and lm.last_stored_tokens == 96
        got = gen(lm, second)
        assert lm.last_reused_tokens == 64 and lm.last_loaded_tokens == 64
        assert lm.last_reused_by_tier.get("host") == 64 and sum(lm.last_reused_by_tier.values()) == 64
        assert lm.last_ttft_seconds is not None and lm.last_ttft_seconds > 0
    assert_greedy_equivalent(gen(model, second), got, ATOL[dtype])


def test_sampling_with_the_same_seed_gives_the_same_tokens(tmp_path):
    model = make_model("llama")
    ids = prompt(3, 80)
    with tier_cache(model, tmp_path) as cache:
        lm = TierCachedLM(model, cache)
        lm.generate(ids, max_new_tokens=1)
        torch.manual_seed(5)
        got = lm.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, num_return_sequences=2)
        assert lm.last_reused_tokens == 79  # whole prompt cached: its last token is recomputed for the logits
    torch.manual_seed(5)
    assert torch.equal(got, model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, num_return_sequences=2))


def test_beam_search_reuses_the_prefix(tmp_path):
    model = make_model("qwen2")
    ids = prompt(4, 64)
    with tier_cache(model, tmp_path) as cache:
        lm = TierCachedLM(model, cache, layerwise=True)
        lm.generate(ids[:, :48], max_new_tokens=1)
        got = lm.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
        assert lm.last_reused_tokens == 48
    assert torch.equal(got, model.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=2,
                                           do_sample=False))


def test_whole_prompt_cached_still_prefills_its_last_token(tmp_path):
    model = make_model("llama", torch.bfloat16)
    ids = prompt(5, 96)  # exactly 6 blocks
    with tier_cache(model, tmp_path) as cache:
        lm = TierCachedLM(model, cache)
        lm.generate(ids, max_new_tokens=1)
        got = gen(lm, ids)
        assert lm.last_loaded_tokens == 96 and lm.last_reused_tokens == 95
        assert lm.last_reused_by_tier.get("host") == 96
        assert lm.last_stored_tokens == 0  # nothing new to store
    assert_greedy_equivalent(gen(model, ids), got, ATOL[torch.bfloat16])


def test_partial_prefix_reuses_only_the_full_shared_blocks(tmp_path):
    model = make_model("gpt2")
    a = prompt(6, 90)
    b = torch.cat([a[:, :40], prompt(7, 50)], dim=1)  # 40 shared tokens: 2 full blocks
    with tier_cache(model, tmp_path) as cache:
        lm = TierCachedLM(model, cache)
        lm.generate(a, max_new_tokens=1)
        got = gen(lm, b)
        assert lm.last_reused_tokens == 32 and lm.last_reused_by_tier.get("host") == 32
        assert lm.last_stored_tokens == 80  # b's own 5 full blocks are now cached
        assert cache.lookup(b[0]) == 80
    assert_greedy_equivalent(gen(model, b), got, ATOL[torch.float32])


def test_reused_kv_feeds_attention(tmp_path):
    """Storing wrong KV under the prompt's tokens changes the output; storing the model's own KV does not."""
    model = make_model("llama")
    ids = prompt(8, 81)  # 5 full blocks + 1 token
    ref = gen(model, ids)
    with torch.no_grad():
        past = model(ids[:, :80], use_cache=True).past_key_values
    layout = layout_for_model(model)
    true_kv = torch.stack([torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)])
                           for layer in past.layers])
    assert true_kv.shape == layout.kv_shape(80)
    noise = torch.randn(true_kv.shape, generator=torch.Generator().manual_seed(0)) * true_kv.std()
    for kv, should_match in ((true_kv, True), (noise, False)):
        with tier_cache(model, tmp_path / str(should_match), disk=False) as cache:
            assert cache.store(ids[0, :80], kv.contiguous()) == 80
            lm = TierCachedLM(model, cache, layerwise=not should_match)
            got = gen(lm, ids)
            assert lm.last_reused_tokens == 80
        close = all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ref.logits, got.logits, strict=True))
        assert close is should_match


def test_layerwise_load_from_disk_counts_stalls(tmp_path):
    model = make_model("llama", torch.bfloat16)
    ids = prompt(9, 200)
    with tier_cache(model, tmp_path) as cache:
        TierCachedLM(model, cache).generate(ids, max_new_tokens=1)
    # a restart: the host tier is empty, the prefix comes back from the LMDB disk tier, layer by layer
    with tier_cache(model, tmp_path) as cache:
        lm = TierCachedLM(model, cache, layerwise=True)
        got = gen(lm, ids)
        assert lm.last_reused_tokens == 192 and lm.last_reused_by_tier.get("disk") == 192
        assert list(lm.last_layer_waits) == [0, 1]  # each layer waited for once, in forward order
        assert lm.last_kv_wait_seconds == pytest.approx(sum(lm.last_layer_waits.values()))
        assert lm.last_kv_wait_seconds > 0
        stats = cache.stats()
        assert stats["prefetch_wait_seconds"] > 0
        assert stats["hit_tokens"]["disk"] == 192
    assert_greedy_equivalent(gen(model, ids), got, ATOL[torch.bfloat16])


def test_layout_for_model_reads_the_config():
    assert layout_for_model(make_model("llama")).to_dict() == {
        "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32", "block_size": 16, "planes": 2}
    assert layout_for_model(make_model("gpt2", torch.float16), block_size=32).to_dict() == {
        "num_layers": 2, "num_kv_heads": 4, "head_dim": 16, "dtype": "float16", "block_size": 32, "planes": 2}
    assert layout_for_model(make_model("qwen2", torch.bfloat16)).num_kv_heads == 1


def test_bad_input_raises_naming_the_field(tmp_path):
    model = make_model("llama")
    with tier_cache(model, tmp_path, disk=False) as cache:
        lm = TierCachedLM(model, cache)
        with pytest.raises(ValueError, match="input_ids: batch size 1"):
            lm.generate(prompt(1, 20).repeat(2, 1))
        with pytest.raises(TypeError, match="input_ids"):
            lm.generate(torch.rand(1, 20))
        with pytest.raises(ValueError, match="attention_mask"):
            lm.generate(prompt(1, 20), attention_mask=torch.zeros(1, 20, dtype=torch.long))
        with pytest.raises(ValueError, match="past_key_values"):
            lm.generate(prompt(1, 20), past_key_values=object())
        with pytest.raises(ValueError, match="cache: not supported"):
            lm.generate(prompt(1, 20), cache=object())
        with pytest.raises(ValueError, match="use_cache"):
            lm.generate(prompt(1, 20), use_cache=False)
    with tier_cache(make_model("qwen2"), tmp_path, disk=False) as other:
        with pytest.raises(ValueError, match="layout.num_kv_heads"):
            TierCachedLM(model, other)


def test_wrong_cache_object_is_a_type_error():
    model = make_model("llama")
    with pytest.raises(TypeError, match="cache: expected a TierCache"):
        TierCachedLM(model, object())


def test_salt_isolates_tenants(tmp_path):
    model = make_model("llama")
    ids = prompt(10, 64)
    with tier_cache(model, tmp_path, disk=False) as cache:
        TierCachedLM(model, cache, salt="tenant-a").generate(ids, max_new_tokens=1)
        other = TierCachedLM(model, cache, salt="tenant-b")
        other.generate(ids, max_new_tokens=1)
        assert other.last_reused_tokens == 0
        same = TierCachedLM(model, cache, salt="tenant-a")
        same.generate(ids, max_new_tokens=1)
        assert same.last_reused_tokens == 63
        with pytest.raises(TypeError, match="salt"):
            TierCachedLM(model, cache, salt=3)


def test_corrupt_disk_block_mid_load_falls_back_to_recompute(tmp_path):
    """A frame that fails its checksum after layer 0 was handed out: the whole prompt is recomputed."""
    import lmdb

    model = make_model("llama", torch.bfloat16)
    ids = prompt(11, 70)
    with tier_cache(model, tmp_path) as cache:
        TierCachedLM(model, cache).generate(ids, max_new_tokens=1)
    env = lmdb.open(str(tmp_path), max_dbs=8, subdir=True)
    with env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn, create=False)
        key, frame = next(iter(txn.cursor(db=blocks)))
        frame = bytearray(frame)
        frame[-1] ^= 0xFF  # the last layer's segment of one block
        txn.put(key, bytes(frame), db=blocks)
    env.close()
    with tier_cache(model, tmp_path) as cache:
        lm = TierCachedLM(model, cache, layerwise=True)
        got = gen(lm, ids)
        assert lm.last_reused_tokens == 0 and lm.last_loaded_tokens == 0
        assert cache.stats()["corrupt_blocks"]["disk"] == 1
    assert_greedy_equivalent(gen(model, ids), got, ATOL[torch.bfloat16])


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_generate_emits_no_deprecation_warning(tmp_path, layerwise):
    """The cache is handed to `generate` under the keyword the installed transformers expects (no FutureWarning)."""
    import warnings

    from tiercache.integrations import hf

    model = make_model("llama")
    ids = prompt(5, 40)
    with tier_cache(model, tmp_path) as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = TierCachedLM(model, cache, layerwise=layerwise)
        lm.generate(ids, max_new_tokens=2, do_sample=False)
        lm.generate(ids, max_new_tokens=2, do_sample=False)  # the second call hands over a filled cache
        assert lm.last_reused_tokens == 32
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and "past_key_values" in str(w.message)]
    assert deprecations == []
    from transformers.generation import utils as generation_utils

    expected = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
    assert hf.CACHE_KWARG == expected

