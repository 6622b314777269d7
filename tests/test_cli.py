"""The `tiercache` command line as a user meets it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def tiercache(*args: str, block: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter; `block` names a module made unimportable (as if not installed)."""
    prelude = f"import sys; sys.modules[{block!r}] = None; " if block else "import sys; "
    code = prelude + "from tiercache.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def test_no_command_prints_usage_and_fails():
    p = tiercache()
    assert p.returncode == 2
    assert p.stderr.startswith("usage: tiercache COMMAND") and "demo" in p.stderr and "plan" in p.stderr


def test_help_succeeds():
    p = tiercache("--help")
    assert p.returncode == 0 and "usage: tiercache COMMAND" in p.stdout


def test_unknown_command_is_one_line_exit_2():
    p = tiercache("frobnicate")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown command 'frobnicate'" in lines[0] and "demo" in lines[0]
    assert p.stdout == ""


def test_demo_without_transformers_names_the_extra():
    p = tiercache("demo", block="transformers")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "pip install 'tiercache[transformers]'" in lines[0] and "Traceback" not in p.stderr


def test_demo_help_needs_no_transformers():
    p = tiercache("demo", "--help", block="transformers")
    assert p.returncode == 0 and "--full" in p.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_demo_on_cuda_without_cuda_is_one_line():
    pytest.importorskip("transformers")
    p = tiercache("demo", "--device", "cuda")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "CUDA is not available" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_demo_bad_device_name_is_one_line():
    pytest.importorskip("transformers")
    p = tiercache("demo", "--device", "tpu9")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--device tpu9" in p.stderr


def test_missing_extra_inside_a_command_is_one_line():
    """Any command that reaches an optional dependency that is missing ends with the extra's install line."""
    from tiercache.cli import missing_extra_message

    msg = missing_extra_message("tiercache bench", ModuleNotFoundError("No module named 'redis'", name="redis"))
    assert msg == ("tiercache bench: error: this command needs redis, which is not installed; "
                   "run: pip install 'tiercache[redis]'")
    assert missing_extra_message("x", ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None


def test_plan_is_a_command():
    p = tiercache("plan", "--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--host", "1MiB", "--no-probe")
    assert p.returncode == 0, p.stderr
    assert "host" in p.stdout and "bytes/token" in p.stdout


def test_bench_without_transformers_says_so_before_measuring():
    p = tiercache("bench", "--chunks", "1", "--layers", "1", block="transformers", timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tiercache[transformers]'" in lines[0] and "--e2e off" in lines[0]


def test_installed_console_script():
    """The `tiercache` executable pip installs behaves like the module (skipped where it is not on PATH)."""
    import os
    import shutil

    exe = shutil.which("tiercache") or shutil.which("tiercache", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no tiercache executable on PATH (package not installed)")
    p = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("usage: tiercache COMMAND")
    p = subprocess.run([exe, "nope"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
