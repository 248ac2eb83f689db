"""Write toy arithmetic chat data (``flare.data.arithmetic``) to a JSONL file.

Two answer styles over the same problems, to measure distribution match (method §5):
- ``steps`` (in-distribution): column arithmetic, right to left, ending ``Answer: 85``;
- ``offdist``: place values left to right, the result in words, ending ``\\boxed{85}``.

Rows are ``{"messages": [user, assistant], "answer": "85"}`` (the extra key lets evaluation score a file).
``python -m recipes.arithmetic --out data/add.jsonl --count 1000 --max-digits 3 --ops +- --style steps``
"""

from __future__ import annotations

import argparse
import sys

from flare.data.arithmetic import STYLES, generate_rows, reasoning_gym_rows


def main(argv: list[str] | None = None) -> int:
    from flare.data.jsonl import write_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSONL file to write")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-digits", type=int, default=1)
    ap.add_argument("--max-digits", type=int, default=3)
    ap.add_argument("--ops", default="+", help="operators to draw from, e.g. '+-'")
    ap.add_argument("--style", choices=STYLES, default="steps")
    ap.add_argument("--reasoning-gym", metavar="TASK", help="take problems from this reasoning_gym task instead")
    args = ap.parse_args(argv)
    if args.reasoning_gym:
        try:
            rows = reasoning_gym_rows(args.reasoning_gym, args.count, args.seed)
        except ModuleNotFoundError as e:
            print(f"skipped: {e}", file=sys.stderr)
            return 0
    else:
        rows = generate_rows(args.count, args.seed, style=args.style, min_digits=args.min_digits,
                             max_digits=args.max_digits, ops=args.ops)
    print(f"wrote {write_jsonl(rows, args.out)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
