#!/usr/bin/env bash
# The README's seed study: the default GRPO run (from bundled/sft_adapters) with seeds 0 1 2, then one table of
# held-out math accuracy before/after, with the mean gain and the seed-to-seed spread. ~16 minutes on 2 cores.
# Run from the repository root: bash scripts/seeds.sh [SEED ...]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("${@:-0 1 2}")
for s in ${seeds[@]}; do
  python run.py --stage grpo --init-adapters bundled/sft_adapters --seed "$s" --out "runs/grpo-seed$s"
done
python - ${seeds[@]} <<'PY'
import json, statistics, sys
rows = [(s, json.load(open(f"runs/grpo-seed{s}/summary.json"))) for s in sys.argv[1:]]
print(f"{'seed':<6}{'format':>8}{'math before':>13}{'math after':>12}{'gain':>8}{'length':>8}")
for s, r in rows:
    b, a = r["before"], r["after"]
    print(f"{s:<6}{a['strict_format_rate']:>8.3f}{b['math_accuracy']:>13.3f}{a['math_accuracy']:>12.3f}"
          f"{a['math_accuracy'] - b['math_accuracy']:>+8.3f}{a['completion_len_mean']:>8.1f}")
after = [r["after"]["math_accuracy"] for _, r in rows]
gain = statistics.mean(after) - rows[0][1]["before"]["math_accuracy"]
print(f"mean after {statistics.mean(after):.3f}, mean gain {gain:+.3f}, spread (max - min) {max(after) - min(after):.3f}"
      + (f", std {statistics.stdev(after):.3f}" if len(after) > 1 else ""))
PY
