"""Random store / lookup / load / prefetch / close-reopen sequences against a plain dict model.

KV for a block is a pure function of its token prefix (as in a real model), so
the model knows the only right answer for every block; the cache may forget
anything (it is a cache) but may never return different bytes, and never
exceed a tier's capacity.
"""

import shutil
import tempfile

import hypothesis.strategies as st
import torch
import xxhash
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.layerwise import KVUnavailable

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float16, block_size=2)
VOCAB = st.integers(min_value=0, max_value=3)      # few tokens: prompts share prefixes often


def block_kv(prefix: tuple[int, ...]) -> torch.Tensor:
    seed = xxhash.xxh64_intdigest(repr(prefix).encode()) & 0x7FFFFFFF
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.block_shape, generator=g).to(LAYOUT.dtype)


def prompt_kv(tokens: list[int]) -> torch.Tensor:
    B = LAYOUT.block_size
    blocks = [block_kv(tuple(tokens[: (i + 1) * B])) for i in range(len(tokens) // B)]
    kv = torch.cat(blocks, dim=2) if blocks else torch.empty(LAYOUT.kv_shape(0), dtype=LAYOUT.dtype)
    tail = len(tokens) - kv.shape[2]
    if tail:
        kv = torch.cat([kv, torch.zeros(LAYOUT.kv_shape(tail), dtype=LAYOUT.dtype)], dim=2)
    return kv


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tiercache-prop-")
        self.policy = "write_through"
        self.cache = None
        self.open(host_blocks=3, device_blocks=1, disk_blocks=12, policy="write_through")

    def open(self, host_blocks, device_blocks, disk_blocks, policy, admission="all"):
        from tiercache.tiers.disk import charged_bytes
        frame_guess = LAYOUT.block_bytes + 200
        self.cfg = CacheConfig(layout=LAYOUT, model_id="prop", host_bytes=host_blocks * LAYOUT.block_bytes,
                               device_bytes=device_blocks * LAYOUT.block_bytes, disk_path=self.dir,
                               disk_bytes=disk_blocks * charged_bytes(frame_guess), write_policy=policy,
                               admission=admission)
        self.cache = TierCache(self.cfg)

    def check_prefix(self, tokens, out):
        B = LAYOUT.block_size
        n = out.shape[2]
        assert n % B == 0 and n <= (len(tokens) // B) * B
        if n:
            want = prompt_kv(tokens)[:, :, :n]
            assert torch.equal(out.view(torch.uint8), want.view(torch.uint8)), "bytes differ from what was stored"

    @rule(tokens=st.lists(VOCAB, min_size=0, max_size=10))
    def store(self, tokens):
        n = self.cache.store(tokens, prompt_kv(tokens))
        assert n % LAYOUT.block_size == 0 and n <= len(tokens)

    @rule(tokens=st.lists(VOCAB, min_size=0, max_size=10))
    def lookup(self, tokens):
        n = self.cache.lookup(tokens)
        assert n % LAYOUT.block_size == 0 and n <= len(tokens)

    @rule(tokens=st.lists(VOCAB, min_size=0, max_size=10))
    def load(self, tokens):
        self.check_prefix(tokens, self.cache.load(tokens))

    @rule(tokens=st.lists(VOCAB, min_size=2, max_size=10), room=st.integers(0, 6))
    def load_into(self, tokens, room):
        buf = torch.full(LAYOUT.kv_shape(room), float("nan"), dtype=LAYOUT.dtype)
        self.check_prefix(tokens, self.cache.load(tokens, out=buf))

    @rule(tokens=st.lists(VOCAB, min_size=2, max_size=10))
    def prefetch_then_load(self, tokens):
        self.cache.prefetch(tokens).wait()
        self.check_prefix(tokens, self.cache.load(tokens))

    @rule(tokens=st.lists(VOCAB, min_size=2, max_size=10))
    def load_layers(self, tokens):
        evicted = self.cache.stats()["evictions"].get("disk", 0)
        ll = self.cache.load_layers(tokens)
        try:
            self.check_prefix(tokens, ll.wait())
        except KVUnavailable:
            # fails closed only when the disk evicted a block the load had planned (the write-behind
            # commits evictions concurrently); never for any other reason
            assert self.cache.stats()["evictions"].get("disk", 0) > evicted

    @rule(tokens=st.lists(VOCAB, min_size=2, max_size=10))
    def lookup_equals_load(self, tokens):
        self.cache.flush()  # nothing in the background between the two calls
        n = self.cache.lookup(tokens)
        out = self.cache.load(tokens)
        assert out.shape[2] == n, (n, out.shape[2])
        self.check_prefix(tokens, out)

    @rule()
    def flush(self):
        self.cache.flush()

    @rule(policy=st.sampled_from(["write_through", "write_back"]), host=st.integers(0, 4),
          device=st.integers(0, 2), admission=st.sampled_from(["all", "second_hit"]),
          disk=st.sampled_from([4, 12]))
    def close_and_reopen(self, policy, host, device, admission, disk):
        self.cache.close()
        self.open(host_blocks=host, device_blocks=device, disk_blocks=disk, policy=policy, admission=admission)

    @invariant()
    def idle_cache_holds_nothing_in_flight(self):
        self.cache.flush()
        for tier, f in self.cache.stats()["in_flight"].items():
            assert f == {"pinned": 0, "reserved": 0}, (tier, f)

    @precondition(lambda self: self.cache is not None)
    @invariant()
    def capacities_hold(self):
        s = self.cache.stats()
        for tier, used in s["used_bytes"].items():
            assert used <= s["capacity_bytes"][tier], (tier, used, s["capacity_bytes"][tier])
        assert s["corrupt_blocks"].get("disk", 0) == 0

    def teardown(self):
        if self.cache is not None:
            self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheProperties = CacheMachine.TestCase
