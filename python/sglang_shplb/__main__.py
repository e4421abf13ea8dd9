"""`sglang-shplb VERB [args]` (or `python -m sglang_shplb VERB`): one entry point for the stage CLIs.

    prepare | profile | budget | plan | permute | serve   (serve = python -m sglang_shplb.launch_server)
"""
from __future__ import annotations

import importlib
import sys

VERBS = {"prepare": "models", "profile": "profile", "budget": "budget", "plan": "plan", "permute": "permute",
         "serve": "launch_server"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown verb {argv[0]!r}; choose one of {', '.join(VERBS)}", file=out)
        print(__doc__.strip(), file=out)
        return 0 if out is sys.stdout else 2
    verb, rest = argv[0], argv[1:]
    if verb == "prepare":
        rest = ["prepare", *rest]
    module = importlib.import_module(f"sglang_shplb.{VERBS[verb]}")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
