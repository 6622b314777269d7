"""The `tiercache` command: demo, bench, inspect, serve-metrics.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this
file only dispatches, so `tiercache --help` stays fast (no torch import).
"""

from __future__ import annotations

import sys

_COMMANDS = {
    "demo": ("tiercache.demo", "main", "run the long-context RAG workload without and with the cache"),
    "bench": ("tiercache.bench", "main", "measure tier throughput against memcpy, raw disk reads and peers"),
    "inspect": ("tiercache.inspect_store", "main", "show what a disk store holds"),
    "serve-metrics": ("tiercache.metrics", "main_serve_metrics", "serve Prometheus metrics over HTTP"),
}


def _usage() -> str:
    lines = ["usage: tiercache COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
    lines += ["", "Run 'tiercache COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"tiercache {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in _COMMANDS:
        print(f"tiercache: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = _COMMANDS[cmd]
    import importlib
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
