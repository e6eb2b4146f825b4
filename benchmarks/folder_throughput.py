"""Folder throughput of guided-swap explain: images/s for 1 process against N torchrun processes, with DataLoader
decode workers off and on (and, when figures are drawn, writer processes off and on).

    python benchmarks/folder_throughput.py                      # 64 JPEGs, resnet18 at 224 px, maps only, CPU
    python benchmarks/folder_throughput.py --count 32 --size 112 --processes 1 2 --workers 0 2
    python benchmarks/folder_throughput.py --save png,npz --writers 0 2       # with figures
    python benchmarks/folder_throughput.py --save npz png,npz --workers 0 --writers 0 2   # side by side

Several --save modes in one run are interleaved (each configuration runs every mode before the next one starts,
so load on the machine falls on all of them alike); each figure mode's table then gives its time against the
maps-only time of the same configuration measured in the same run ("time x maps-only": the ratio of the loop
times, the same images in both).

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


def command(processes: int, folder: str, out: str, args, workers: int, writers: int, save: str):
    explain = ["-m", "guided_swap", "explain", folder, "--model", args.model, "--size", str(args.size),
               "--save", save, "--batch-size", str(args.batch_size), "--workers", str(workers),
               "--writers", str(writers), "--device", args.device, "--out", out]
    if processes == 1:
        return [sys.executable] + explain
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] + explain


def run_one(processes: int, workers: int, writers: int, save: str, folder: str, root: str, args) -> dict:
    out = os.path.join(root, f"out-{processes}-{workers}-{writers}-{save.replace(',', '_')}")
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MPLBACKEND": "Agg"}
    started = time.perf_counter()
    done = subprocess.run(command(processes, folder, out, args, workers, writers, save), capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es), {workers} workers, --save {save} failed:\n{done.stderr[-3000:]}")
    match = re.search(r"explained (\d+) image\(s\) in ([\d.]+) s \(([\d.]+) images/s", done.stderr)
    return {"save": save, "processes": processes, "workers": workers, "writers": writers,
            "threads_per_process": threads,
            "images": int(match[1]), "loop_s": float(match[2]), "loop_images_per_s": float(match[3]),
            "wall_s": round(wall, 1), "wall_images_per_s": round(int(match[1]) / wall, 2)}


def table(rows, args, save: str) -> str:
    """The rows of one --save mode; a figure mode measured beside maps only also gets its time against theirs."""
    maps_only = {_config(r): r for r in rows if r["save"] == "npz"}
    mine = [r for r in rows if r["save"] == save]
    beside = save != "npz" and any(_config(r) in maps_only for r in mine)
    lines = [f"Folder throughput, {args.model} at {args.size} px, {args.count} JPEGs (640 x 480), --save {save}, "
             f"batch {args.batch_size}, device {args.device}, {os.cpu_count()} CPU cores, torch {_torch()}"
             + (", measured in the same run as --save " + " and ".join(m for m in args.save if m != save)
                if len(args.save) > 1 else "") + ".", "",
             "| processes | decode workers (each) | writers (each) | threads (each) | loop images/s | wall s | "
             "wall images/s |" + (" maps-only loop images/s | time x maps-only |" if beside else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if beside else "")]
    for r in mine:
        line = (f"| {r['processes']} | {r['workers']} | {r['writers']} | {r['threads_per_process']} | "
                f"{r['loop_images_per_s']:.2f} | {r['wall_s']:.1f} | {r['wall_images_per_s']:.2f} |")
        if beside:
            base = maps_only.get(_config(r))
            line += (f" {base['loop_images_per_s']:.2f} | {r['loop_s'] / base['loop_s']:.2f} |"
                     if base else " | |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _config(row) -> tuple:
    return row["processes"], row["workers"], row["writers"]


def write_results(rows, args) -> None:
    """One pair of files per --save mode (maps only, figures too), each replaced whole, never half-written."""
    from guided_swap._files import atomic_write

    for save in args.save:
        stem = os.path.join(args.results, "folder_throughput_" + save.replace(",", "_"))
        config = dict(vars(args), save=save, measured_with=args.save)
        with atomic_write(stem + ".json") as path, open(path, "w") as stream:
            json.dump({"config": config, "machine": platform.platform(), "cpus": os.cpu_count(),
                       "rows": [r for r in rows if r["save"] == save]}, stream, indent=1)
        with atomic_write(stem + ".md") as path, open(path, "w") as stream:
            stream.write(table(rows, args, save))


def _torch() -> str:
    import torch

    return torch.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save", nargs="+", default=["npz"],
                        help="npz (the maps), png,npz (figures too) or png; several are measured interleaved")
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
                    for save in args.save:
                        rows.append(run_one(processes, workers, writers, save, folder, root, args))
                        print(json.dumps(rows[-1]), flush=True)
    write_results(rows, args)
    for save in args.save:
        print(table(rows, args, save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
