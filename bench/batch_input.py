"""Write an OpenAI batch input file of N chat lines (for `cplane batch submit` runs).

    .venv/bin/python bench/batch_input.py 100000 /tmp/in.jsonl [--max-tokens 16]

One line at a time: the file is never held in memory.
"""

from __future__ import annotations

import argparse

import orjson


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lines", type=int)
    ap.add_argument("out")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model", default="sim")
    args = ap.parse_args()
    with open(args.out, "wb") as fh:
        for i in range(args.lines):
            fh.write(orjson.dumps({
                "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": args.model, "max_tokens": args.max_tokens,
                         "messages": [{"role": "user", "content": f"question number {i}"}]},
            }) + b"\n")


if __name__ == "__main__":
    main()
