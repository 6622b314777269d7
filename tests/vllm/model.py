"""The tests' model: `tiercache.tools.tiny_llama` (shared with `tiercache bench --vllm`)."""

from tiercache.tools.tiny_llama import build, corpus, prompt

__all__ = ["build", "corpus", "prompt"]
