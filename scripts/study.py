"""The README's seed study and probability-reward ablations of the embedded default, and their table.

Each variant is the default `python run.py --stage grpo` from the bundled SFT adapters plus a few flags, run with
seeds 0 1 2 (same SFT start); the table gives, per variant, the held-out (greedy) math accuracy and general exact
match after GRPO (mean over seeds, spread = max - min, and std), the mean probability reward and strict format.

    python scripts/study.py                    # all variants x seeds 0 1 2 (~15 runs of ~5 min each on 2 cores)
    python scripts/study.py --variants default --seeds 0 1 2
    python scripts/study.py --table-only       # print the table of the runs already in runs/study/

A run whose summary.json exists is not run again (delete its folder to redo it), so a killed study resumes.
`--jobs 2` runs two at a time, each pinned to one core (`taskset`); the wall time of each run is then not the
default's (docs/embedded_default.md has both).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "default": [],
    "no_debias": ["--no-prob-debias"],  # reward p, not clip(p - p_base, 0, 1)
    "no_std_filter": ["--no-prob-std-filter"],
    "notebook_defects": ["--prob-notebook-defects"],  # tags + EOS in the mean, last 256 tokens only
    "format_only": ["--general-reward", "format_only"],  # general prompts: strict format reward only
}
METRICS = [("math_accuracy", "math"), ("general_exact_match", "general EM"), ("prob_reward_mean", "prob reward"),
           ("strict_format_rate", "format")]


def run_dir(variant: str, seed: int) -> str:
    return os.path.join(ROOT, "runs", "study", f"{variant}-seed{seed}")


def command(variant: str, seed: int) -> list:
    return [sys.executable, os.path.join(ROOT, "run.py"), "--stage", "grpo", "--init-adapters",
            os.path.join(ROOT, "bundled", "sft_adapters"), "--seed", str(seed), "--out", run_dir(variant, seed),
            *VARIANTS[variant]]


def run_all(jobs: list, parallel: int) -> None:
    """Run the (variant, seed) jobs without a summary.json yet, `parallel` at a time; logs go to each run dir."""
    todo = [j for j in jobs if not os.path.exists(os.path.join(run_dir(*j), "summary.json"))]
    running = []
    while todo or running:
        while todo and len(running) < parallel:
            variant, seed = todo.pop(0)
            os.makedirs(run_dir(variant, seed), exist_ok=True)
            cmd, core = command(variant, seed), None
            if parallel > 1:  # the first core no running job holds (a finished job frees its core)
                busy = {r[4] for r in running}
                core = next(c for c in range(max(os.cpu_count(), parallel)) if c not in busy)
                cmd = ["taskset", "-c", str(core % os.cpu_count()), *cmd]
            log = open(os.path.join(run_dir(variant, seed), "log.txt"), "w")
            print(f"start {variant} seed {seed}: {' '.join(cmd)}", flush=True)
            running.append(((variant, seed), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT),
                            time.time(), log, core))
        time.sleep(2)
        for item in list(running):
            (variant, seed), proc, t0, log, _ = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see log.txt)"
                print(f"{status} {variant} seed {seed} in {time.time() - t0:.0f} s", flush=True)


def stats(values: list) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} (spread {max(values) - min(values):.3f}, std {std:.3f})"


def table(variants: list, seeds: list) -> str:
    """The markdown table of the finished runs: SFT start, then each variant's after-GRPO numbers."""
    rows, start = [], None
    for v in variants:
        done = [json.load(open(p)) for s in seeds if os.path.exists(p := os.path.join(run_dir(v, s), "summary.json"))]
        if not done:
            continue
        start = start or done[0]["before"]
        rows.append((f"{v} ({len(done)} seeds)", {k: [d["after"][k] for d in done] for k, _ in METRICS}))
    if start is None:
        return "no finished runs"
    head = "| held-out, greedy | " + " | ".join(name for _, name in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|",
             "| SFT start | " + " | ".join(f"{start[k]:.3f}" for k, _ in METRICS) + " |"]
    lines += [f"| {name} | " + " | ".join(stats(vals[k]) for k, _ in METRICS) + " |" for name, vals in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each pinned to one core when > 1)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    if not args.table_only:
        run_all([(v, s) for v in args.variants for s in args.seeds], args.jobs)
        print(f"study wall time: {(time.time() - t0) / 60:.1f} min")
    print(table(args.variants, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
