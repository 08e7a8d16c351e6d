#!/usr/bin/env python3
"""The alternative to Half-Space Trees, on the same eval: an isolation
forest over a sliding window (Liu, Ting & Zhou 2008), replayed on the
sample stream the scorer saw in the last `make eval` run.

    .venv/bin/python eval/compare_models.py [--out target/eval]

Reads target/eval/scorer/samples.jsonl (every sample the scorer scored,
with its features and the half-space trees' anomaly; `--sample-log`) and
target/eval/access.json (the labels). Replays the samples in order through
an isolation forest that, like the scorer's model, learns only unpenalized
samples: 100 trees of 256 points drawn from the last 512 learned samples,
rebuilt every 128 learned samples, each point scored by the forest built
before it. Both models see the same features (`ln(1 + x)`), and both are
judged on the same samples, per scenario, as the report does (a client's
mean anomaly; AUC of each attack scenario's clients against all benign
clients). Pure Python (no numpy in the venv), seeded: the same run gives
the same figures. Prints a table; writes compare_models.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import report  # noqa: E402

TREES, PSI, WINDOW, REBUILD = 100, 256, 512, 128
MAX_DEPTH = math.ceil(math.log2(PSI))


def c(n: int) -> float:
    """Average path length of an unsuccessful BST search over n points."""
    if n <= 1:
        return 0.0
    return 2 * (math.log(n - 1) + 0.5772156649) - 2 * (n - 1) / n


def build(points: list[list[float]], rng: random.Random, depth: int = 0):
    if depth >= MAX_DEPTH or len(points) <= 1:
        return ("leaf", len(points))
    dims = [d for d in range(len(points[0])) if min(p[d] for p in points) < max(p[d] for p in points)]
    if not dims:
        return ("leaf", len(points))
    q = rng.choice(dims)
    lo, hi = min(p[q] for p in points), max(p[q] for p in points)
    split = rng.uniform(lo, hi)
    left = [p for p in points if p[q] < split]
    right = [p for p in points if p[q] >= split]
    return ("node", q, split, build(left, rng, depth + 1), build(right, rng, depth + 1))


def path_length(tree, x: list[float], depth: int = 0) -> float:
    while tree[0] == "node":
        _, q, split, left, right = tree
        tree = left if x[q] < split else right
        depth += 1
    return depth + c(tree[1])


class SlidingForest:
    def __init__(self, seed: int = 5):
        self.rng = random.Random(seed)
        self.window: list[list[float]] = []
        self.trees = []
        self.since = 0

    def score(self, x: list[float]) -> float | None:
        if not self.trees:
            return None
        mean = sum(path_length(t, x) for t in self.trees) / len(self.trees)
        return 2 ** (-mean / c(PSI))

    def learn(self, x: list[float]):
        self.window.append(x)
        del self.window[:-WINDOW]
        self.since += 1
        if self.since >= REBUILD or (not self.trees and len(self.window) >= PSI):
            self.since = 0
            n = min(PSI, len(self.window))
            self.trees = [build(self.rng.sample(self.window, n), self.rng) for _ in range(TREES)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE.parent / "target" / "eval")
    args = p.parse_args(argv)
    samples_path = args.out / "scorer" / "samples.jsonl"
    rep = json.loads((args.out / "report.json").read_text())
    kinds = {n: r["kind"] for n, r in rep["scenarios"].items()}
    t_start = rep["run"]["started_at"]
    owners: dict[tuple, set] = {}
    for r in report.load_requests(args.out / "access.json"):
        owners.setdefault((r.xff, r.agent), set()).add(r.scenario)

    forest = SlidingForest()
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    lines = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    lines.sort(key=lambda s: s["t_ms"])
    for s in lines:
        x = [math.log1p(max(0.0, v)) for v in s["features"]]
        iso = forest.score(x)
        if not s["penalized"]:
            forest.learn(x)
        if s["t_ms"] < t_start * 1000 or iso is None or s.get("anomaly") is None:
            continue
        addr, _, tag = s["client"].partition("#")
        names = owners.get((addr, tag or None), set())
        if len(names) != 1:
            continue
        row = per.setdefault(next(iter(names)), {}).setdefault(s["client"], {"hst": [], "iforest": []})
        row["hst"].append(s["anomaly"])
        row["iforest"].append(iso)

    mean = lambda v: sum(v) / len(v)
    result = {}
    for model in ("hst", "iforest"):
        benign = [mean(c[model]) for n, cs in per.items() if kinds.get(n) == "benign" for c in cs.values()]
        result[model] = {n: report.auc(benign, [mean(c[model]) for c in cs.values()])
                         for n, cs in per.items() if kinds.get(n) == "attack"}
    names = sorted(result["hst"])
    print(f"{'attack scenario':24s} {'clients':>7s} {'HST AUC':>8s} {'iForest AUC':>11s}")
    for n in names:
        h, i = result["hst"][n], result["iforest"][n]
        print(f"{n:24s} {len(per[n]):7d} {h if h is None else f'{h:.3f}':>8} {i if i is None else f'{i:.3f}':>11}")
    both = [(result["hst"][n], result["iforest"][n]) for n in names
            if result["hst"][n] is not None and result["iforest"][n] is not None]
    summary = {m: round(sum(v[k] for v in both) / len(both), 3) if both else None for k, m in enumerate(("hst", "iforest"))}
    print(f"{'mean over scenarios':24s} {'':7s} {summary['hst']!s:>8} {summary['iforest']!s:>11}")
    benign_clients = sum(len(cs) for n, cs in per.items() if kinds.get(n) == "benign")
    print(f"({benign_clients} benign clients sampled; {len(lines)} samples replayed)")
    (args.out / "compare_models.json").write_text(json.dumps(
        {"auc": result, "mean": summary, "benign_clients": benign_clients, "samples": len(lines)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
