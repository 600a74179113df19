"""Is the guard ever worse than no guard? Member by member, a study against the same study run with --no-guard.

    irnn reproduce adding --budget quick                # runs/adding-seed-quick
    irnn reproduce adding --budget quick --no-guard     # runs/adding-seed-quick-noguard
    python benchmarks/guard_vs_noguard.py runs/adding-seed-quick runs/adding-seed-quick-noguard

Prints one row per member (its final metric, the step it was solved at, the guard's rollbacks and
absorbed spikes, whether the two curves are the same value for value) and a last line that counts the
members where the guarded run ended worse. Exit status 1 if any did, 2 on bad input.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from irnn.results.aggregate import collect


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}" if isinstance(x, float) else f"{x:,}"


def compare(guarded: Path, raw: Path) -> tuple[list[list[str]], int]:
    """The table rows and how many members ended worse with the guard than without."""
    a, b = {m.name: m for m in collect(guarded)}, {m.name: m for m in collect(raw)}
    if set(a) != set(b):
        raise ValueError(f"the two studies have different members: only in {guarded}: {sorted(set(a) - set(b))}; "
                         f"only in {raw}: {sorted(set(b) - set(a))}")
    rows, worse = [], 0
    for name, g in a.items():
        r = b[name]
        if g.state != "completed" or r.state != "completed":
            rows.append([name, g.state, r.state] + ["-"] * 6)  # the states where the finals go
            worse += g.state != "completed" and r.state == "completed"
            continue
        higher = g.summary.get("best_test_acc") is not None  # accuracy: higher is better; MSE: lower
        key = "final_test_acc" if higher else "final_test_mse"
        fg, fr = g.summary[key], r.summary[key]
        bad = (fg < fr) if higher else (fg > fr)
        worse += bad
        rows.append([name, _fmt(fg), _fmt(fr), _fmt(g.summary.get("solved_step")), _fmt(r.summary.get("solved_step")),
                     _fmt(g.summary.get("guard_interventions") or 0), _fmt(g.summary.get("spikes_absorbed") or 0),
                     "yes" if (g.evals, g.train_loss) == (r.evals, r.train_loss) else "no", "WORSE" if bad else "ok"])
    return rows, worse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("guarded", type=Path, help="the study's folder (guard on)")
    p.add_argument("raw", type=Path, help="the same study run with --no-guard")
    args = p.parse_args(argv)
    try:
        rows, worse = compare(args.guarded, args.raw)
    except (OSError, ValueError, KeyError) as e:
        print(f"guard_vs_noguard: error: {e}", file=sys.stderr)
        return 2
    head = ["member", "final (guard)", "final (no guard)", "solved at (guard)", "solved at (no guard)",
            "rollbacks", "spikes absorbed", "same curve", "guard"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{worse} of {len(rows)} members ended worse with the guard than without it")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
