"""Peak anonymous memory (RssAnon) and images/s of `cnnlab train` for one net on 1x, 4x and 16x
the data, and under torchrun on 1 vs 2 ranks.

    nice -n 5 .venv/bin/python bench/memory_scaling.py --data ../shared/data/cifar10/train
    nice -n 5 .venv/bin/python bench/memory_scaling.py --code before=/tmp/cnnlab-before,after=. --rounds 2

The data: N images (N / classes of each class, the first in name order) as a folder of symbolic
links under --work (/tmp), never a copy. Each size is trained first on an emptied cache ("cold":
decoding fills it), then --rounds times on the filled cache ("warm": the run a user makes every
day, and the one the targets are about). ``--code LABEL=DIR,...`` runs the cnnlab package found in
each DIR (on PYTHONPATH, from a working folder outside the repository, each with a cache folder of
its own), alternating run by run, so that code from before a change is measured side by side with
the same script.

Memory: a thread of this script reads /proc/PID/status of each training process every 20 ms (the
``cnnlab train`` process; under ``--nproc`` each rank, neither torchrun's agent in the launching
process nor the decoding workers) and keeps the peak of RssAnon, summed over the ranks at each
instant. RssAnon is what a process holds of its own (heap, tensors); pages of a file it maps, which
the page cache holds once for every process, are RssFile. The kernel keeps no peak of RssAnon
(VmHWM is the peak of all resident pages, mapped files included, and is shown beside it), hence
sampling; glibc keeps freed blocks for reuse in a cnnlab process (runtime.keep_freed_memory), so
RssAnon seldom falls back within 20 ms and a short peak is not missed.

Speed: images/s of the last epoch (history.csv), so that the first steps' warm-up is left out
when --epochs is 2 or more.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_model, linked_subset  # noqa: E402

SAMPLE_S = 0.02


def status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of ``pid`` in bytes ({} once it has ended)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes: its own pages, plus each shared page (a mapped
    file, a library) divided among the processes sharing it; summed over processes, what they use
    of the machine's memory, the page cache's one copy of the data counted once."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    found = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(found[1]) * 1024 if found else 0


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def is_rank(pid: int) -> bool:
    try:
        return b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


class Sampler(threading.Thread):
    """Peaks of the summed RssAnon of the training processes under ``root`` (``root`` itself with
    one process; its children that are torchrun ranks with several)."""

    def __init__(self, root: int, ranks: int):
        super().__init__(daemon=True)
        self.root, self.ranks, self.done = root, ranks, threading.Event()
        self.peak_anon = self.peak_file = self.peak_pss = 0
        self.hwm: dict[int, int] = {}
        self.rank_peak: dict[int, int] = {}

    def pids(self) -> list[int]:
        if self.ranks == 1:
            return [self.root]
        known = [p for p in self.rank_peak]
        if len(known) < self.ranks:  # the ranks start once; look again until all are there
            known = [p for p in children(self.root) if is_rank(p)]
            for p in known:
                self.rank_peak.setdefault(p, 0)
        return known

    def run(self) -> None:
        pids, next_look, count = [], 0.0, 0
        while not self.done.is_set():
            count += 1
            if count % 10 == 0:  # smaps_rollup walks every mapping: read it less often
                self.peak_pss = max(self.peak_pss, sum(pss(p) for p in pids))
            if time.monotonic() >= next_look:
                pids, next_look = self.pids(), time.monotonic() + 0.5
            stats = {p: status(p) for p in pids}
            stats = {p: s for p, s in stats.items() if s}
            self.peak_anon = max(self.peak_anon, sum(s["RssAnon"] for s in stats.values()))
            self.peak_file = max(self.peak_file, sum(s["RssFile"] for s in stats.values()))
            for p, s in stats.items():
                self.hwm[p] = s["VmHWM"]
                self.rank_peak[p] = max(self.rank_peak.get(p, 0), s["RssAnon"])
            time.sleep(SAMPLE_S)


def subset(data: Path, n: int, work: Path) -> Path:
    """A folder of ``n`` images of ``data`` (n / classes per class), as symbolic links."""
    folder = work / f"data-{n}"
    classes = sorted(d for d in data.iterdir() if d.is_dir() and not d.name.startswith("."))
    per = n // len(classes)
    if folder.is_dir() and sum(1 for _ in folder.rglob("*")) == n + len(classes):
        return folder
    return linked_subset(data, per, folder)


def train(args, folder: Path, name: str, cache: Path, nproc: int) -> dict:
    """One `cnnlab train`; its peak memory and last epoch's images/s."""
    out = Path(args.work) / "runs"
    command = [sys.executable, "-m", "cnnlab", "train", "--model", args.model, "--data", str(folder),
               "--epochs", str(args.epochs), "--no-tensorboard", "--out", str(out), "--name", name]
    command += ["--nproc", str(nproc)] if nproc > 1 else ["--threads", str(args.threads)]
    command += ["--image-size", str(args.image_size)] if args.image_size else []
    env = {**os.environ, "PYTHONPATH": str(args.code), "CNNLAB_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=args.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sampler = Sampler(proc.pid, nproc)
    sampler.start()
    output = proc.communicate()[0]
    sampler.done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{output[-3000:]}")
    run_dir = Path(output.strip().splitlines()[-1])
    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    return {"anon": sampler.peak_anon, "file": sampler.peak_file, "pss": sampler.peak_pss,
            "hwm": sum(sampler.hwm.values()),
            "ranks": sorted(sampler.rank_peak.values()) if nproc > 1 else [sampler.peak_anon],
            "images_per_s": float(history[-1]["images_per_s"]), "wall_s": time.perf_counter() - start}


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def cache_for(work: Path, label: str) -> Path:
    cache = work / f"cache-{label}"
    cache.mkdir(exist_ok=True)
    kernels = Path.home() / ".cache/cnnlab/kernels"  # the compiled kernels, so that no run compiles them
    if kernels.is_dir() and not (cache / "kernels").exists():
        (cache / "kernels").symlink_to(kernels)
    return cache


def measure(args, codes: dict[str, str], folder: Path, n: int, nproc: int, cold: bool) -> dict[str, list]:
    """Each code's runs on ``folder``: a cold one (its cache emptied first) when ``cold``, else
    --rounds warm ones, the codes alternating round by round (drift on a shared machine hits both)."""
    results: dict[str, list] = {label: [] for label in codes}
    for r in range(1 if cold else args.rounds):
        for label, code in codes.items():
            cache = cache_for(Path(args.work), label)
            if cold:
                for entry in [*cache.glob("images-*"), *cache.glob("rows-*")]:
                    entry.unlink()
            args.code = code
            when = "cold" if cold else f"warm{r + 1}"
            result = train(args, folder, f"{label}-n{n}-p{nproc}-{when}", cache, nproc)
            results[label].append(result)
            ranks = f" (ranks {', '.join(map(mb, result['ranks']))})" if nproc > 1 else ""
            print(f"{label:>8} {n:>7,} images {nproc} process(es) {when}: peak RssAnon {mb(result['anon'])} MB{ranks}, "
                  f"RssFile {mb(result['file'])} MB, Pss {mb(result['pss'])} MB, VmHWM {mb(result['hwm'])} MB, "
                  f"{result['images_per_s']:,.0f} images/s, {result['wall_s']:.0f} s", flush=True)
    return results


def gather_speed(entry: Path, batch: int = 128, batches: int = 300, rounds: int = 3) -> tuple[float, float]:
    """Batches/s of a training step's gather (``images[index]``, a random batch) from the array of the
    cache entry ``entry`` read into memory, and memory-mapped (its pages in the page cache), in
    alternating rounds; the best round of each. One thread: on a shared machine two threads' gathers
    wait on each other's barrier (OpenMP) more than on memory."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    held = torch.from_numpy(np.load(entry))
    mapped = torch.from_numpy(np.load(entry, mmap_mode="c"))
    mapped.view(-1)[::4096].sum()  # every page read once, as the first epoch does
    generator = torch.Generator().manual_seed(0)
    best = {"memory": 0.0, "mapped": 0.0}
    for _ in range(rounds):
        for name, images in (("memory", held), ("mapped", mapped)):
            index = [torch.randint(len(images), (batch,), generator=generator) for _ in range(batches)]
            start = time.perf_counter()
            for i in index:
                images[i]
            best[name] = max(best[name], batches / (time.perf_counter() - start))
    return best["memory"], best["mapped"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train"))
    parser.add_argument("--sizes", default="2500,10000,40000", help="images at 1x, 4x, 16x, ...")
    parser.add_argument("--model", default="pool-bn")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, help="pixels a side (default: the preset's, 32)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the one process")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun ranks compared with one process, on the "
                                                             "largest size (0: none)")
    parser.add_argument("--rounds", type=int, default=1, help="warm runs of each size and code")
    parser.add_argument("--code", default=f"this={ROOT}",
                        help="LABEL=DIR[,LABEL=DIR]: the folders holding each cnnlab package to measure")
    parser.add_argument("--work", default="/tmp/cnnlab-memscale")
    parser.add_argument("--warm-only", action="store_true", help="no cold runs: the caches are filled already")
    args = parser.parse_args()
    codes = {}
    for item in args.code.split(","):
        label, _, folder = item.rpartition("=")
        codes[label or Path(folder).name] = str(Path(folder).resolve())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"cpu: {cpu_model()}; {os.cpu_count()} cores; {args.model} at {args.image_size or 'its'} px, "
          f"{args.epochs} epoch(s), --threads {args.threads}, "
          f"{args.rounds} warm round(s); code: {codes}", flush=True)
    rows = []  # (label, images, processes, cold result, warm results)
    for n in sizes:
        folder = subset(Path(args.data), n, work)
        cold = measure(args, codes, folder, n, 1, cold=True) if not args.warm_only else None
        warm = measure(args, codes, folder, n, 1, cold=False)
        rows += [(label, n, 1, cold[label][0] if cold else None, warm[label]) for label in codes]
    if args.ranks > 1:  # on the smallest and the largest size: what the data adds, one process against ranks
        for n in (sizes[0], sizes[-1]):
            warm = measure(args, codes, subset(Path(args.data), n, work), n, args.ranks, cold=False)
            rows += [(label, n, args.ranks, None, warm[label]) for label in codes]
    print("\n| code | images | processes | peak RssAnon, cold cache (MB) | peak RssAnon, warm (MB) | vs 1x | "
          "peak Pss, warm (MB) | images/s, warm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    peak = {(label, n, p): max(r["anon"] for r in warm) for label, n, p, _, warm in rows}
    for label, n, p, cold, warm in rows:
        speeds = sorted(r["images_per_s"] for r in warm)
        speed = f"{statistics.median(speeds):,.0f}" + (f" ({', '.join(f'{x:,.0f}' for x in speeds)})"
                                                       if len(speeds) > 1 else "")
        ratio = f"{peak[(label, n, p)] / peak[(label, sizes[0], p)]:.2f}x"
        if p > 1:
            ranks = ", ".join(mb(max(r["ranks"][i] for r in warm)) for i in range(p))
            ratio += f"; {peak[(label, n, p)] / peak[(label, n, 1)]:.2f}x one process (ranks {ranks})"
        print(f"| {label} | {n:,} | {p} | {mb(cold['anon']) if cold else ''} | {mb(peak[(label, n, p)])} | "
              f"{ratio} | {mb(max(r['pss'] for r in warm))} | {speed} |")
    big, small = sizes[-1], sizes[0]
    entries = sorted((work / f"cache-{list(codes)[-1]}").glob("*.npy"), key=lambda e: e.stat().st_size)
    if entries:
        held, mapped = gather_speed(entries[-1])
        print(f"\na batch of 128 gathered from {entries[-1].name} ({entries[-1].stat().st_size / 2**20:,.0f} MB): "
              f"{held:,.0f} batches/s from memory, {mapped:,.0f} mapped ({mapped / held:.2f}x)")
    for label in codes:
        line = f"{label}: {big:,} / {small:,} images {peak[(label, big, 1)] / peak[(label, small, 1)]:.2f} (target <= 1.25)"
        if args.ranks > 1:
            grown = {p: (peak[(label, big, p)] - peak[(label, small, p)]) / 2**20 for p in (1, args.ranks)}
            line += (f"; {args.ranks} ranks / 1 process on {big:,} images {peak[(label, big, args.ranks)] / peak[(label, big, 1)]:.2f}"
                     f" (target < 1.5); RssAnon the data adds from {small:,} to {big:,} images: {grown[1]:,.0f} MB on "
                     f"1 process, {grown[args.ranks]:,.0f} MB on {args.ranks} ranks")
        print(line)


if __name__ == "__main__":
    main()
