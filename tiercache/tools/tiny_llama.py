"""A small Llama and a tokenizer, built locally (nothing is downloaded): the vLLM tests' model and the TTFT bench's.

`build(dir)`: a BPE tokenizer trained on generated text, and a 4-layer Llama (hidden 512, 8 heads /
2 KV heads, bf16, head_dim 64) with seeded random weights, both saved with `save_pretrained`.
Large enough that a prefill is measurably slower than a cache hit; small enough for CI on 2 cores.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("retrieval augmented generation cache tier host disk block token prefix layer attention "
         "the a of and to in is for on with as by at from that this it be are was or an which "
         "model server request prompt answer question document chapter section river mountain "
         "city history science music energy water light sound number system memory process").split()


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n_lines)]


def build(out: Path, num_layers: int = 4, hidden: int = 512, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.05, torch_dtype="bfloat16", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def prompt(n_tokens: int, seed: int, vocab: int = 400) -> list[int]:
    """Token ids that avoid the special ids (0..2)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n_tokens)]
