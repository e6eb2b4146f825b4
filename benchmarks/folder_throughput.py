"""Folder throughput of guided-swap explain: images/s for 1 process against N torchrun processes, with DataLoader
decode workers off and on (and, when figures are drawn, writer processes off and on).

    python benchmarks/folder_throughput.py                      # 64 JPEGs, resnet18 at 224 px, maps only, CPU
    python benchmarks/folder_throughput.py --count 32 --size 112 --processes 1 2 --workers 0 2
    python benchmarks/folder_throughput.py --save png,npz --writers 0 2       # with figures

Each configuration explains the same folder of JPEGs (640 x 480 scikit-image photos, so decoding costs what it
costs on real photos) into a fresh folder. "loop images/s" is what the run reports: images explained and written
per second between its first and last batch (the slowest rank's time), without start-up (imports, model build,
process group); "wall s" is the whole command. Threads: each process gets cores / processes intra-op threads
(OMP_NUM_THREADS), so every configuration uses the same cores. Results go to
benchmarks/results/folder_throughput_<save>.{md,json}, one pair per --save mode.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera", "cat")


def make_folder(root: str, count: int) -> str:
    import numpy as np
    from PIL import Image
    from skimage import data, transform

    folder = os.path.join(root, "photos")
    for i in range(count):
        image = getattr(data, PHOTOS[i % len(PHOTOS)])()
        image = image if image.ndim == 3 else np.stack([image] * 3, axis=-1)
        image = (transform.resize(image[..., :3], (480, 640), anti_aliasing=True) * 255).astype(np.uint8)
        path = os.path.join(folder, f"part{i % 4}", f"photo{i:04d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path, quality=90)
    return folder


def command(processes: int, folder: str, out: str, args, workers: int, writers: int):
    explain = ["-m", "guided_swap", "explain", folder, "--model", args.model, "--size", str(args.size),
               "--save", args.save, "--batch-size", str(args.batch_size), "--workers", str(workers),
               "--writers", str(writers), "--device", args.device, "--out", out]
    if processes == 1:
        return [sys.executable] + explain
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] + explain


def run_one(processes: int, workers: int, writers: int, folder: str, root: str, args) -> dict:
    out = os.path.join(root, f"out-{processes}-{workers}-{writers}")
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MPLBACKEND": "Agg"}
    started = time.perf_counter()
    done = subprocess.run(command(processes, folder, out, args, workers, writers), capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es), {workers} workers failed:\n{done.stderr[-3000:]}")
    match = re.search(r"explained (\d+) image\(s\) in ([\d.]+) s \(([\d.]+) images/s", done.stderr)
    return {"processes": processes, "workers": workers, "writers": writers, "threads_per_process": threads,
            "images": int(match[1]), "loop_s": float(match[2]), "loop_images_per_s": float(match[3]),
            "wall_s": round(wall, 1), "wall_images_per_s": round(int(match[1]) / wall, 2)}


def table(rows, args) -> str:
    lines = [f"Folder throughput, {args.model} at {args.size} px, {args.count} JPEGs (640 x 480), --save {args.save}, "
             f"batch {args.batch_size}, device {args.device}, {os.cpu_count()} CPU cores, torch {_torch()}.", "",
             "| processes | decode workers (each) | writers (each) | threads (each) | loop images/s | wall s | "
             "wall images/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['workers']} | {r['writers']} | {r['threads_per_process']} | "
              f"{r['loop_images_per_s']:.2f} | {r['wall_s']:.1f} | {r['wall_images_per_s']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows, args) -> None:
    """One pair of files per --save mode (maps only, figures too), each replaced whole, never half-written."""
    from guided_swap._files import atomic_write

    stem = os.path.join(args.results, "folder_throughput_" + args.save.replace(",", "_"))
    with atomic_write(stem + ".json") as path, open(path, "w") as stream:
        json.dump({"config": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows},
                  stream, indent=1)
    with atomic_write(stem + ".md") as path, open(path, "w") as stream:
        stream.write(table(rows, args))


def _torch() -> str:
    import torch

    return torch.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save", default="npz", help="npz (the maps) or png,npz (figures too: matplotlib-bound)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--writers", type=int, nargs="+", default=[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        folder = make_folder(root, args.count)
        rows = []
        for processes in args.processes:
            for workers in args.workers:
                for writers in args.writers:
                    rows.append(run_one(processes, workers, writers, folder, root, args))
                    print(json.dumps(rows[-1]), flush=True)
    write_results(rows, args)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
