"""RAG workload generator and byte tokenizer: deterministic, the shapes benchmarks rely on."""

from __future__ import annotations

import pytest

from tiercache.tools.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, ByteTokenizer
from tiercache.tools.workload import make_rag_workload


def test_same_seed_same_workload_and_other_seed_differs():
    a = make_rag_workload(seed=7, num_documents=3, questions_per_document=2, document_tokens=400, system_tokens=64)
    b = make_rag_workload(seed=7, num_documents=3, questions_per_document=2, document_tokens=400, system_tokens=64)
    c = make_rag_workload(seed=8, num_documents=3, questions_per_document=2, document_tokens=400, system_tokens=64)
    assert a == b
    assert [r.token_ids for r in a.requests] != [r.token_ids for r in c.requests]


def test_shapes_with_the_byte_tokenizer_are_exact():
    w = make_rag_workload(seed=0, num_documents=4, questions_per_document=3, document_tokens=1000, system_tokens=128)
    assert len(w.documents) == 4 and all(len(q) == 3 for q in w.questions)
    assert len(w.requests) == 12
    assert sorted((r.document, r.question) for r in w.requests) == [(d, q) for d in range(4) for q in range(3)]
    assert [r.index for r in w.requests] == list(range(12))
    system = w.requests[0].token_ids[:128]
    for r in w.requests:
        assert r.system_tokens == 128 and r.prefix_tokens == 128 + 1000
        assert r.token_ids[0] == BOS_ID and r.token_ids[:128] == system
        assert r.num_tokens > r.prefix_tokens  # the question follows the shared prefix
        assert ByteTokenizer().decode(r.token_ids) == r.text
    # requests on one document share system + document exactly; different documents share only the system prompt
    by_doc: dict[int, list] = {}
    for r in w.requests:
        by_doc.setdefault(r.document, []).append(r)
    for rs in by_doc.values():
        assert len({r.token_ids[:r.prefix_tokens] for r in rs}) == 1
        assert len({r.token_ids for r in rs}) == len(rs)
    assert w.requests[0].token_ids[128:1128] != next(
        r for r in w.requests if r.document != w.requests[0].document).token_ids[128:1128]
    assert w.unique_prefix_tokens == 128 + 4 * 1000
    assert w.total_prompt_tokens == sum(r.num_tokens for r in w.requests)


def test_questions_are_shuffled_across_documents():
    w = make_rag_workload(seed=0, num_documents=4, questions_per_document=3, document_tokens=200, system_tokens=32)
    docs = [r.document for r in w.requests]
    assert docs != sorted(docs)


def test_custom_encoder_gives_at_least_the_target_lengths():
    def encode(text: str) -> list[int]:  # a word-level stand-in for a real tokenizer
        return [len(word) for word in text.split()]

    w = make_rag_workload(seed=1, num_documents=2, questions_per_document=2, document_tokens=300,
                          system_tokens=50, encode=encode, bos_id=None)
    for r in w.requests:
        assert r.system_tokens >= 50 and r.prefix_tokens - r.system_tokens >= 300
        assert list(r.token_ids) == encode(w.system_prompt) + encode(w.documents[r.document]) + \
            list(r.token_ids[r.prefix_tokens:])


@pytest.mark.parametrize("field,value,exc", [
    ("num_documents", 0, ValueError), ("questions_per_document", -1, ValueError),
    ("document_tokens", 1.5, TypeError), ("system_tokens", True, TypeError), ("seed", "x", TypeError),
])
def test_bad_arguments_name_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        make_rag_workload(**{field: value})


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, KV → cache"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and all(0 <= i < VOCAB_SIZE for i in ids)
    assert len(ids) == len(text.encode()) + 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == f"<bos>{text}<eos>"
    with pytest.raises(ValueError, match="ids"):
        tok.decode([VOCAB_SIZE])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_workload_module_writes_a_trace(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "trace.jsonl"
    p = subprocess.run([sys.executable, "-m", "tiercache.tools.workload", "--out", str(out), "--documents", "2",
                        "--questions", "2", "--doc-tokens", "64", "--system-tokens", "16"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    w = make_rag_workload(seed=0, num_documents=2, questions_per_document=2, document_tokens=64, system_tokens=16)
    assert [r["token_ids"] for r in rows] == [list(r.token_ids) for r in w.requests]
    bad = subprocess.run([sys.executable, "-m", "tiercache.tools.workload", "--out", str(out), "--documents", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "num_documents" in bad.stderr
