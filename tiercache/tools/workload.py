"""Seeded, deterministic long-context RAG workload.

A request is `system prompt + one retrieved document + one question`. Several
questions are asked about each document and all requests are shuffled, so a
document comes back after others have pushed it out of the faster tiers: the
access pattern prefix caching serves in RAG. The same seed gives the same text
and the same token ids in every process (Python's `random.Random`, no `hash()`).

Segments are tokenized separately and concatenated, so the token ids of the
shared prefix (system + document) are identical across its requests whatever
the tokenizer does at segment boundaries.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tiercache.tools.tokenizer import ByteTokenizer

_WORDS = (
    "the cache layer stores key value blocks for each prefix and returns them when a later prompt shares the "
    "same tokens model attention memory host disk device tier latency throughput request document question "
    "answer retrieval context window token sequence batch kernel stream copy compress restore evict admit "
    "policy metric counter gauge histogram server client cluster replica shard index table record field "
    "value system user assistant report quarter revenue growth margin forecast risk contract clause party "
    "term payment delivery warranty liability patient study trial dose outcome cohort protocol sample "
    "engine turbine pressure valve sensor reading threshold alarm operator shift maintenance schedule river "
    "basin rainfall flood station gauge network route packet router link failure recovery backup snapshot"
).split()
_TOPICS = ("quarterly finance", "supply contract", "clinical trial", "turbine maintenance", "river monitoring",
           "network operations", "storage cluster", "customer support", "legal review", "research survey")
_QUESTION_FORMS = (
    "What does the document say about the {w}?",
    "Summarise every mention of {w} and {v} in two sentences.",
    "Which section discusses the {w}, and what is its conclusion?",
    "List the risks related to {w} mentioned above.",
    "How are {w} and {v} connected according to the text?",
    "Give the key number reported for the {w}.",
)


@dataclass(frozen=True)
class RagRequest:
    """One prompt of the workload. `prefix_tokens` = system + document tokens, shared by its document's requests."""

    index: int
    document: int
    question: int
    text: str
    token_ids: tuple[int, ...]
    system_tokens: int
    prefix_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class RagWorkload:
    seed: int
    system_prompt: str
    documents: tuple[str, ...]
    questions: tuple[tuple[str, ...], ...]
    requests: tuple[RagRequest, ...]

    @property
    def unique_prefix_tokens(self) -> int:
        """Tokens of KV worth caching: the system prompt once plus every document (what the store must hold)."""
        seen: dict[int, RagRequest] = {}
        for r in self.requests:
            seen.setdefault(r.document, r)
        if not seen:
            return 0
        system = next(iter(seen.values())).system_tokens
        return system + sum(r.prefix_tokens - r.system_tokens for r in seen.values())

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _text_of_tokens(rng: random.Random, target: int, encode: Callable[[str], list[int]], lead: str,
                    exact_bytes: bool) -> str:
    """Sentences of pseudo-English until `encode(text)` reaches `target` tokens."""
    parts = [lead]
    length = len(lead)
    words_since_check = 0
    while True:
        n = rng.randint(8, 18)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(2, 9999)))
        sentence = " ".join(words).capitalize() + ". "
        if rng.random() < 0.08:
            sentence += "\n\n"
        parts.append(sentence)
        length += len(sentence)
        words_since_check += n
        if exact_bytes:
            if length >= target:
                return "".join(parts)[:target]
        elif words_since_check >= 64:
            words_since_check = 0
            text = "".join(parts)
            if len(encode(text)) >= target:
                return text


def make_rag_workload(
    *,
    seed: int = 0,
    num_documents: int = 4,
    questions_per_document: int = 3,
    document_tokens: int = 3000,
    system_tokens: int = 512,
    encode: Callable[[str], Sequence[int]] | None = None,
    bos_id: int | None = None,
) -> RagWorkload:
    """Build the workload.

    `encode(text) -> token ids` defaults to the byte tokenizer, for which `document_tokens` and
    `system_tokens` are exact; with another tokenizer each segment is at least that many tokens.
    `bos_id` (default: the byte tokenizer's `<bos>` when `encode` is None, else no BOS) starts every prompt.
    """
    seed_ok = not isinstance(seed, bool) and isinstance(seed, int)
    if not seed_ok:
        raise TypeError(f"seed: expected an int, got {seed!r}")
    _positive(num_documents, "num_documents")
    _positive(questions_per_document, "questions_per_document")
    _positive(document_tokens, "document_tokens")
    _positive(system_tokens, "system_tokens")
    exact = encode is None
    if encode is None:
        tok = ByteTokenizer()
        encode = tok.encode
        bos_id = tok.bos_token_id if bos_id is None else bos_id
    elif not callable(encode):
        raise TypeError(f"encode: expected a callable text -> token ids, got {type(encode).__name__}")

    def enc(text: str) -> list[int]:
        return [int(t) for t in encode(text)]

    bos = [] if bos_id is None else [int(bos_id)]
    rng = random.Random(seed)
    system = _text_of_tokens(
        rng, max(system_tokens - len(bos), 1), enc,
        "You are a careful assistant. Answer only from the retrieved document; say so when it is silent. ", exact)
    documents: list[str] = []
    questions: list[tuple[str, ...]] = []
    for d in range(num_documents):
        topic = _TOPICS[d % len(_TOPICS)]
        header = f"\n\n### Document {d + 1}: {topic} report\n\n"
        body_target = max(document_tokens - len(enc(header)), 1)
        documents.append(header + _text_of_tokens(rng, body_target, enc, "", exact))
        qs = []
        for _ in range(questions_per_document):
            form = rng.choice(_QUESTION_FORMS)
            qs.append(form.format(w=rng.choice(_WORDS), v=rng.choice(_WORDS)))
        questions.append(tuple(qs))

    system_ids = bos + enc(system)
    doc_ids = [enc(doc) for doc in documents]
    order = [(d, q) for d in range(num_documents) for q in range(questions_per_document)]
    rng.shuffle(order)
    requests = []
    for i, (d, q) in enumerate(order):
        question = f"\n\nQuestion: {questions[d][q]}\nAnswer:"
        ids = system_ids + doc_ids[d] + enc(question)
        requests.append(RagRequest(index=i, document=d, question=q, text=system + documents[d] + question,
                                   token_ids=tuple(ids), system_tokens=len(system_ids),
                                   prefix_tokens=len(system_ids) + len(doc_ids[d])))
    return RagWorkload(seed=seed, system_prompt=system, documents=tuple(documents), questions=tuple(questions),
                       requests=tuple(requests))


def write_jsonl(workload: RagWorkload, path: str) -> None:
    """One request per line: {"request", "document", "question", "token_ids"} (a trace for `tiercache plan`)."""
    import json

    with open(path, "w") as f:
        for r in workload.requests:
            f.write(json.dumps({"request": r.index, "document": r.document, "question": r.question,
                                "token_ids": list(r.token_ids)}) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m tiercache.workload --out trace.jsonl`: write the RAG workload as a request trace."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tiercache.workload",
                                description="Write the seeded RAG workload (byte-tokenizer ids) as a JSONL trace.")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--documents", type=int, default=6)
    p.add_argument("--questions", type=int, default=5, help="questions per document")
    p.add_argument("--doc-tokens", type=int, default=3000)
    p.add_argument("--system-tokens", type=int, default=512)
    a = p.parse_args(argv)
    try:
        w = make_rag_workload(seed=a.seed, num_documents=a.documents, questions_per_document=a.questions,
                              document_tokens=a.doc_tokens, system_tokens=a.system_tokens)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    write_jsonl(w, a.out)
    print(f"{len(w.requests)} requests, {w.total_prompt_tokens} tokens -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
