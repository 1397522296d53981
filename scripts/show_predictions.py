"""Print a few test MRs with what the adapted model and the base alone wrote for them, and their slot errors.

    python scripts/show_predictions.py                    # 4 MRs from outputs/ and outputs_base/ (after dvc repro)
    python scripts/show_predictions.py -n 10 --every 2    # 10 MRs, every second one

Reads the decode stages' examples.jsonl files (one record per MR: its prediction and references), matched by MR,
so what it prints is what the run generated and scored. The README's "What the default run produces" is its output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, without installing

from steps.core.common import iter_jsonl, run_stage
from steps.metrics.slot_error import check_corpus, is_e2e_mr


def unique_predictions(path: Path) -> dict[str, str]:
    """context -> prediction, in order of first appearance."""
    found: dict[str, str] = {}
    for _, record in iter_jsonl(path):
        found.setdefault(record["context"], record["prediction"])
    return found


def render(adapted: dict[str, str], base: dict[str, str] | None, count: int, every: int) -> str:
    contexts = list(adapted)[:: max(1, every)][:count]
    e2e = all(is_e2e_mr(c) for c in contexts)
    checks = check_corpus(list(adapted), list(adapted.values())) if e2e else None
    base_checks = check_corpus(list(base), list(base.values())) if e2e and base else None
    index = {c: i for i, c in enumerate(adapted)}
    base_index = {c: i for i, c in enumerate(base or {})}
    blocks = []
    for context in contexts:
        lines = [f"MR:      {context}", f"adapted: {adapted[context]}"]
        if checks is not None:
            lines[-1] += f"   [{checks[index[context]].describe() or 'no slot error'}]"
        if base is not None and context in base:
            lines.append(f"base:    {base[context]}")
            if base_checks is not None:
                lines[-1] += f"   [{base_checks[base_index[context]].describe() or 'no slot error'}]"
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, default=Path("outputs/examples.jsonl"), help="the adapted model's")
    parser.add_argument("--base_predictions", type=Path, default=Path("outputs_base/examples.jsonl"),
                        help="the base alone's (skipped when absent)")
    parser.add_argument("-n", type=int, default=4, help="how many MRs")
    parser.add_argument("--every", type=int, default=1, help="take every k-th MR")
    args = parser.parse_args(argv)

    def body() -> None:
        base = unique_predictions(args.base_predictions) if args.base_predictions.is_file() else None
        print(render(unique_predictions(args.predictions), base, args.n, args.every))

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())
