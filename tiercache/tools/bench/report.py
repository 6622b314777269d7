"""The run's record: machine, code state, and the markdown results file."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess

import torch

from tiercache.tools.bench.protocol import CHUNK_TOKENS, REPO
from tiercache.tools.bench.scale import SCALE_CALL_BLOCKS, SCALE_LAYOUT


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    def slug(text: str, default: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or default

    cpu_short = slug(re.sub(r"\((r|tm)\)|cpu|processor|intel|amd|@.*", "", cpu, flags=re.I), "cpu")
    host = slug(socket.gethostname().split(".")[0], "host")
    return {"name": f"{host}-{cpu_short}-{slug(gpu, 'gpu') if gpu else 'cpu-only'}",
            "hostname": socket.gethostname(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_bytes": mem, "gpu": gpu, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def code_state() -> str:
    """The commit measured (hash and subject), and which of tiercache's files differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        head = git("log", "-1", "--format=%h %s").strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "tiercache").splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        from tiercache import __version__
        return f"tiercache {__version__} (not a git checkout)"
    sha, _, subject = head.partition(" ")
    return f"commit {sha} (\"{subject}\")" + (f", with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _fmt_range(r: dict, digits: int = 2) -> str:
    return f"{r['median']:.{digits}f} ({r['min']:.{digits}f}–{r['max']:.{digits}f})"


def _header(result: dict) -> list[str]:
    m, c = result["machine"], result["config"]
    gib = c["chunks"] * result["chunk_bytes"] / 2**30
    return [f"# tiercache bench — {result['date']} — {m['name']}", "",
            f"- command: `{result['command']}`; code: {result['code']}",
            f"- device: {m['cpu']}, {m['cores']} cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB RAM, "
            f"{m['gpu'] or 'no GPU (CPU-only)'}; Linux {m['kernel']}, Python {m['python']}, torch {m['torch']} "
            f"({m['torch_threads']} threads)",
            f"- workload: {result['layout']}, {c['chunks']} chunks of {CHUNK_TOKENS} tokens "
            f"({result['chunk_bytes'] / 2**20:.0f} MiB each, {gib:.2f} GiB), {c['warmup']} warm-up + "
            f"{c['rounds']} measured rounds, interleaved; every load verified bit-identical",
            f"- cold reads: {result['cold_method']}; resident after the drop: {result['cold_resident']}",
            "- ratio: median over rounds of row ÷ bound measured in the same round (min–max in brackets); "
            "peers' bounds are measured inside each peer's process, next to its rows",
            "- other processes' CPU use while each part ran (mean cores busy, of "
            f"{m['cores']}): " + (", ".join(f"{k} {v:.2f}" for k, v in result.get("other_cpu", {}).items())
                                   or "not measured (no /proc/stat)")]


def _throughput(result: dict) -> list[str]:
    lines = ["## Throughput", "", "| row | GB/s median (min–max) | bound | ratio to the bound | verified |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["throughput"] + result["peer_rows"]:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['row']} | {r['status']} | | | |")
            continue
        own = r["bound"] == r["row"]
        ratio = "—" if own else f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
        lines.append(f"| {r['row']} | {_fmt_range(r)} | {'—' if own else r['bound']} | {ratio} | "
                     f"{'yes' if r['verified'] else 'NO'} |")
    return lines


def _lookup(result: dict) -> list[str]:
    ours = {r["row"]: r for r in result["lookup"]}
    lines = ["## Lookup (Llama-8B layout, 256-token chunks, hashing included)", "",
             "first call right after a load of the same sequence, then the same call repeated", "",
             "| row | µs per chunk, median (min–max) | peer ÷ tiercache | verified |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['row']} | {_fmt_range(r, 1)} | — | {'yes' if r['verified'] else 'NO'} |"
              for r in result["lookup"]]
    for r in result.get("peer_lookup", []):
        own = ours.get(r.get("compare_to") or "")
        vs = f"{r['median'] / own['median']:.1f}x (vs {own['row']})" if own else "—"
        lines.append(f"| {r['row']} | {_fmt_range(r, 1)} | {vs} | {'yes' if r['verified'] else 'NO'} |")
    return lines


def _e2e(result: dict) -> list[str]:
    e = result.get("e2e")
    if not e:
        return ["## End to end", "", "not measured (--e2e off)"]
    m, w = e["model"], e["workload"]
    resident = ("not checked (no fincore)" if e["cold_resident"] is None
                else f"{e['cold_resident'] * 100:.1f}% of the store's files resident at most")
    lines = ["## End to end (transformers integration, the demo's RAG workload)", "",
             f"- model: {m['name']} ({m['params'] / 1e6:.1f}M params, random init from a config), {e['layout']}, "
             f"{e['threads']} torch threads",
             f"- workload ({e['size']}): {w['documents']} documents × {w['questions']} questions = {w['requests']} "
             f"requests, {w['system_tokens']}-token system prompt, {w['document_tokens']}-token documents; "
             f"median prompt {w['prompt_tokens_median']:.0f} tokens, cached prefix {w['reused_tokens_median']:.0f} "
             f"tokens ({w['loaded_bytes_median'] / 2**20:.2f} MiB loaded)",
             f"- ideal = prefill of the uncached suffix with the prefix KV already in a DynamicCache + memcpy of "
             f"the loaded bytes; ratio = warm TTFT ÷ ideal per request; default loading mode: {e['default_mode']}",
             f"- page cache before the cold disk runs: {resident}; "
             f"first token equal to the no-cache run in {e['first_tokens_equal_cold']}/{w['requests']} requests, "
             f"to the ideal run in {e['first_tokens_equal_ideal']}/{w['requests']}; tiers verified: "
             f"{'yes' if e['verified'] else 'NO'}",
             f"- disk rows: the default `compression=\"auto\"` (it chose {e.get('disk_codec') or 'not recorded'} for "
             f"these blocks here), and `compression=\"none\"`", "",
             "| TTFT | ms, median (min–max) | ÷ ideal, median (min–max) | speedup over no cache | KV stall ms |",
             "| --- | --- | --- | --- | --- |"]
    for r in e["rows"]:
        if "ratio" not in r:
            detail = ""
            if "prefill_ms" in r:
                detail = (f" (prefill {r['prefill_ms']['median']:.1f} + memcpy "
                          f"{r['memcpy_ms']['median']:.2f})")
            lines.append(f"| {r['row']} | {_fmt_range(r['ttft_ms'], 1)}{detail} | | | |")
            continue
        name = f"warm, {r['row']}" + (" (default)" if r["default"] else "")
        lines.append(f"| {name} | {_fmt_range(r['ttft_ms'], 1)} | {_fmt_range(r['ratio'])}x | "
                     f"{r['speedup']:.1f}x | {r['kv_wait_ms']:.1f} |")
    lines.append(f"| vLLM + tiercache connector vs vLLM ExampleConnector | {e['vllm']} | | | |")
    return lines


def render_markdown(result: dict) -> str:
    lines = _header(result) + [""] + _throughput(result)
    lines += ["", "## Disk footprint (byteplane)", "", "| data | disk bytes per raw byte (store allocated) | "
              "frame bytes per raw byte | decode GB/s, one core | decode GB/s, threads at once | verified |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in result["footprint"]:
        together = f"{r['decode_gbps_threads']:.2f} ({r['decode_threads']})" if r.get("decode_gbps_threads") else "—"
        lines.append(f"| {r['data']} | {r['ratio']:.3f} | {r['frame_ratio']:.3f} | "
                     f"{r.get('decode_gbps_per_core') or 0:.2f} | {together} | {'yes' if r['verified'] else 'NO'} |")
    lines += [""] + _lookup(result) + [""] + _e2e(result)
    lines += ["", f"## Scale ({SCALE_LAYOUT.fingerprint()}, {SCALE_CALL_BLOCKS} blocks a call)", "",
              "| tier | op | blocks stored | µs per block, median (min–max) | ratio to the smallest store |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {'bound: ' + r['bound'] if r.get('bound') else r['tier']} | {r['op']} | {r['blocks']:,} | "
              f"{_fmt_range(r, 2)} | {r['ratio']:.2f}x |" for r in result["scale"]]
    for section in result.get("sections", []):
        lines += ["", f"## {section['title']}", ""] + _table(section["rows"])
    lines += ["", "## Goals: each a ratio of two figures measured in this run", "",
              "| goal | measured ratio | on | result | missed by |", "| --- | --- | --- | --- | --- |"]
    for g in result["goals"]:
        value = "—" if g["value"] is None else f"{g['value']:.3f}x"
        lines.append(f"| {g['goal']} | {value} | {g['measured_on']} | {g['status']} | {g['miss_by'] or '—'} |")
    return "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> list[str]:
    """A markdown table of flat dicts (columns: the first row's keys; floats to 3 significant digits)."""
    if not rows:
        return ["no rows"]
    cols = list(rows[0])

    def cell(v: object) -> str:
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    return ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)] + [
        "| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
