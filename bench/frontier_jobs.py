"""The penalty frontier's missing runs as parallel jobs: one process per (data set, method, seed), one thread
each, seed by seed and the costliest methods first, so an interrupted command leaves whole seeds behind. Each
job is `bench/regularization_frontier.py --only METHOD --only-seed SEED`, which skips the finished runs: the
command resumes. Other options (`--epochs`, `--train`, `--eval`) pass through to it. The jobs' output goes to
one log; the reports are printed at the end.

    python bench/frontier_jobs.py --processes 2                                  # this machine's CPU
    python bench/frontier_jobs.py --processes 12 --accelerator gpu --results DIR # one GPU shared by 12 jobs

Parallel jobs share the machine, so their training times include the others' load: compare times within
one such command, and the per-step costs of `bench/penalty_cost.py` (one process) for the cost ratios.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.regularization_frontier import RESULTS, data_module  # noqa: E402

# costliest first (TRADES and 10-step PGD-AT train about 10x longer than plain)
METHODS = ("TRADES", "PGD-AT", "FisherWorstDirectionPenalty", "FisherKLPenalty", "PGD-AT, 2 steps", "plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", nargs="+", default=["cifar10", "fashion_mnist"])
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args, passed = parser.parse_known_args()
    if args.processes < 1 or args.seeds < 1:
        parser.error("--processes and --seeds must be at least 1")
    for name in args.data:  # unpack Fashion-MNIST's IDX files once, before the jobs read them
        data_module(name, 1).prepare_data()
    frontier = [sys.executable, str(HERE / "regularization_frontier.py")]
    # processes on one GPU, or more processes than cores, share a device: their wall times are no cost
    sharing = args.processes if args.accelerator == "gpu" or args.processes > (os.cpu_count() or 1) else 1
    common = ["--seeds", str(args.seeds), "--accelerator", args.accelerator, "--results", str(args.results),
              "--sharing", str(sharing), *passed]
    jobs = [[*frontier, "--data", name, "--only", method, "--only-seed", str(seed), *common]
            for seed in range(args.seeds) for method in METHODS for name in args.data]
    log = args.results / f"frontier_jobs_{args.accelerator}.log"
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def work(job: list[str]) -> int:
        done = subprocess.run(job, env=environment, capture_output=True, text=True)
        runs = [line for line in done.stdout.splitlines() if " seed " in line and line.endswith(" s")]
        with log.open("a") as out:
            out.write(f"$ {' '.join(job[1:])}\nexit {done.returncode}\n" + "\n".join(runs) + "\n")
            if done.returncode:
                out.write(done.stderr[-4000:] + "\n")
        print(f"exit {done.returncode}: {' '.join(job[2:8])}", *runs, sep="\n  ", flush=True)
        return done.returncode

    args.results.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.processes) as pool:
        failed = sum(code != 0 for code in pool.map(work, jobs))
    for name in args.data:
        subprocess.run([*frontier, "--data", name, "--report", *common], env=environment, check=False)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
