"""The `tiercache` command: demo, bench, plan, inspect, serve-metrics.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this
file only dispatches, so `tiercache --help` stays fast (no torch import).

Exit status: 0 success, 1 the command ran and reported a failure, 2 a usage
error (no command, unknown command, bad option, missing optional dependency).
A missing optional dependency is one line naming the extra that installs it.
"""

from __future__ import annotations

import sys

_COMMANDS = {
    "demo": ("tiercache.tools.demo", "main", "run a long-context RAG workload without and with the cache"),
    "plan": ("tiercache.tools.plan", "main", "size the tiers for a model: tokens, sequences, load vs recompute time"),
    "bench": ("tiercache.tools.bench", "main", "measure tier throughput against memcpy, raw disk reads and peers"),
    "inspect": ("tiercache.tools.inspect_store", "main", "show what a disk store holds"),
    "serve-metrics": ("tiercache.metrics", "main_serve_metrics", "serve Prometheus metrics over HTTP"),
}

# optional dependency (top-level module) -> the extra that installs it
EXTRAS = {"transformers": "transformers", "tokenizers": "transformers", "redis": "redis", "vllm": "vllm"}


def _usage() -> str:
    lines = ["usage: tiercache COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
    lines += ["", "Run 'tiercache COMMAND --help' for a command's options."]
    return "\n".join(lines)


def missing_extra_message(prog: str, exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra that installs `exc`'s module, or None if it is not an optional dependency."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f"{prog}: error: this command needs {top}, which is not installed; run: pip install 'tiercache[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"tiercache {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in _COMMANDS:
        print(f"tiercache: error: unknown command {cmd!r} (expected one of {', '.join(_COMMANDS)}; "
              "run 'tiercache --help')", file=sys.stderr)
        return 2
    module, func, _ = _COMMANDS[cmd]
    import importlib
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except ModuleNotFoundError as e:
        message = missing_extra_message(f"tiercache {cmd}", e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
