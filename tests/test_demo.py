"""`tiercache demo`: the quick run end to end (real model forward passes, real LMDB disk tier)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
from tiercache.tools import demo  # noqa: E402
from tiercache.tools.workload import make_rag_workload  # noqa: E402


def common_blocks(a, b, block: int) -> int:
    """Tokens of the full blocks of `a` that prefix `b`."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // block * block


def test_default_json_run(capsys, tmp_path):
    assert demo.main(["--json", "--no-progress", "--disk-path", str(tmp_path / "lmdb")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)  # stdout is exactly one JSON object

    preset = demo.PRESETS[demo.DEFAULT_PRESET]
    workload = make_rag_workload(seed=0, num_documents=preset.documents, questions_per_document=preset.questions,
                                 document_tokens=preset.document_tokens, system_tokens=preset.system_tokens)
    rows = summary["requests"]
    assert len(rows) == len(workload.requests) == preset.documents * preset.questions
    # reuse is structural: each prompt reuses the full blocks it shares with an earlier prompt (the disk
    # tier holds every stored block, so nothing is lost); a document's first request shares only the system prompt
    block = summary["block_size"]
    for i, (row, req) in enumerate(zip(rows, workload.requests, strict=True)):
        assert (row["document"], row["question"], row["prompt_tokens"]) == (req.document, req.question,
                                                                            req.num_tokens)
        expected = max((common_blocks(prev.token_ids, req.token_ids, block) for prev in workload.requests[:i]),
                       default=0)
        if any(prev.document == req.document for prev in workload.requests[:i]):
            assert expected >= req.prefix_tokens // block * block
        elif i:
            assert expected == req.system_tokens // block * block
        assert row["reused_tokens"] == expected
        assert sum(row["reused_by_tier"].values()) == expected
        assert row["cold_ttft_s"] > 0 and row["warm_ttft_s"] > 0

    assert summary["reused_tokens"] == sum(r["reused_tokens"] for r in rows)
    assert summary["hit_tokens"] == sum(summary["hit_tokens_by_tier"].values()) == summary["reused_tokens"]
    assert summary["hit_rate"] == pytest.approx(summary["hit_tokens"] / summary["prompt_tokens"])
    # the host tier is smaller than the working set: revisited documents come back from disk
    assert summary["host_bytes"] < summary["working_set_bytes"]
    assert summary["hit_tokens_by_tier"]["disk"] > 0
    assert summary["loaded_bytes_by_tier"]["disk"] > 0
    # compression="auto" decides per machine: the byte-plane codec compresses bf16 KV; "none" stores raw bytes
    assert summary["disk_codec"] in ("byteplane", "none") and summary["disk_codec_why"]
    if summary["disk_codec"] == "byteplane":
        assert summary["disk_compression_ratio"] > 1.0
    else:
        assert 0.98 < summary["disk_compression_ratio"] <= 1.0
    assert summary["cold_ttft_s"] == pytest.approx(sum(r["cold_ttft_s"] for r in rows))
    assert summary["warm_ttft_s"] == pytest.approx(sum(r["warm_ttft_s"] for r in rows))
    # the speedup is reported, never asserted: timings belong to benchmarks, not tests
    assert summary["speedup"] == pytest.approx(summary["cold_ttft_s"] / summary["warm_ttft_s"])
    assert summary["lookup_tokens"] == summary["prompt_tokens"]  # hit rate's denominator: every prompt token
    assert 0 <= summary["kv_wait_s"] <= summary["kv_time_s"] <= summary["warm_ttft_s"]
    assert "cores" in summary["machine"]


def test_table_output_and_progress(capsys, tmp_path):
    argv = ["--documents", "2", "--questions", "2", "--doc-tokens", "160", "--system-tokens", "32",
            "--layers", "2", "--hidden", "128", "--host-bytes", "64KiB", "--disk-path", str(tmp_path)]
    assert demo.main(argv) == 0
    captured = capsys.readouterr()
    for word in ("cold TTFT", "warm TTFT", "speedup", "host", "disk", "disk compression", "hit rate", "KV time",
                 "cores"):
        assert word in captured.out
    assert "4/4" in captured.err  # the progress bar reached the end on stderr


@pytest.mark.parametrize("argv", [["--dtype", "int4"], ["--layers", "0"], ["--hidden", "-64"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_local_checkpoint_with_its_own_tokenizer(capsys, tmp_path):
    """`--model PATH`: model and tokenizer come from a local directory (built here, nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the cache layer stores key value blocks for each prefix document question"] * 4,
                           trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ckpt = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)

    argv = ["--model", str(ckpt), "--dtype", "auto", "--json", "--no-progress", "--documents", "2",
            "--questions", "2", "--doc-tokens", "96", "--system-tokens", "32", "--disk-path", str(tmp_path / "db")]
    assert demo.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == {"name": "ckpt", "random_init": False, "params": summary["model"]["params"]}
    assert summary["dtype"] == "float32" and len(summary["requests"]) == 4
    assert summary["reused_tokens"] > 0 and summary["first_tokens_equal"] == 4


def test_missing_checkpoint_is_an_error(capsys, tmp_path):
    assert demo.main(["--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err


def test_full_is_the_larger_workload():
    args = demo.build_parser().parse_args(["--full"])
    assert args.full
    quick, full = demo.PRESETS[demo.DEFAULT_PRESET], demo.PRESETS["full"]
    assert full.documents * full.questions * (full.document_tokens + full.system_tokens) > \
        4 * quick.documents * quick.questions * (quick.document_tokens + quick.system_tokens)


def test_cuda_device_without_cuda_is_a_one_line_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert demo.main(["--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "CUDA is not available" in err[0]
