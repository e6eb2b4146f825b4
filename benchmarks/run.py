"""Run the side-by-side benchmark and write benchmarks/results/results.{json,md}.

    python benchmarks/run.py                 # the full run (about half an hour on 2 cores)
    python benchmarks/run.py --batches 1 --rounds 2 --rss-repeats 0 --no-conversion   # a quick look

Same as ``guided-swap bench``; see guided_swap/benchmark.py for what is measured and how.
"""
import sys

from guided_swap.checks.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
