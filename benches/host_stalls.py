#!/usr/bin/env python3
"""Does this machine stop now and then when its CPUs are busy and the disk takes synced writes?

On a virtual machine whose host caps its CPU time (a cgroup quota over a 100 ms period, say)
and counts the work of emulating the disk against the same cap, a busy guest that also
writes synchronously is paused, all of it at once, for several milliseconds at a time. No
program inside can avoid those pauses; they set a floor under the tail latency of durable
writes at full load (ringkv's workload a at 16 clients, p99), whatever the code does.

This measures it without ringkv, in four phases of equal length:
- spin: one spinning process per CPU, each noting every gap of more than 2 ms between two
  looks at the clock (a gap is time the process did not run);
- synced: synced direct writes of 4 KiB (O_DIRECT|O_DSYNC, as ringkv's commit log in `sync`
  mode) from `--writers` threads (three by default), beside the same spinners;
- cached: as many writes a second, paced, to the page cache only: the same work for the
  guest's CPUs and scheduler, none for the disk;
- spin again.
Gaps in `synced` far beyond those in `cached` are the disk's work paid for with the
guest's time. It prints, per phase, the gaps seen, the time they took as a share of the
phase, and the longest.

Usage, from the project root:
    benches/host_stalls.py [--seconds 3] [--writers 3] [--dir DIR]
It writes only in a temporary directory (under DIR: by default the system's, where
ringkv's dev clusters keep their data), which it removes. DIR must be on the disk under
test: tmpfs takes direct writes on recent kernels but keeps them in memory, and there
`synced` and `cached` come out alike.
"""

import argparse
import multiprocessing
import os
import mmap
import tempfile
import threading
import time

GAP_S = 0.002
BLOCK_BYTES = 4096
FILE_BYTES = 8 << 20


def spin(seconds, queue):
    """Look at the clock until `seconds` passed; report the gaps longer than GAP_S."""
    gaps = []
    start = last = time.perf_counter()
    while last - start < seconds:
        now = time.perf_counter()
        if now - last > GAP_S:
            gaps.append(now - last)
        last = now
    queue.put(gaps)


def prefill(path):
    """A file of FILE_BYTES on the disk, so that the phases only overwrite it."""
    with open(path, "wb") as f:
        f.write(b"\0" * FILE_BYTES)
        f.flush()
        os.fsync(f.fileno())


def write(path, seconds, counts, rate=None):
    """Writes of one block, round the file at `path` (prefilled), until `seconds` passed:
    synced and direct, or, with `rate` (writes a second), to the page cache at that pace."""
    flags = os.O_WRONLY | (0 if rate else os.O_DIRECT | os.O_DSYNC)
    fd = os.open(path, flags)
    block = mmap.mmap(-1, BLOCK_BYTES)  # page-aligned, as direct I/O needs
    block.write(b"x" * BLOCK_BYTES)
    n, offset = 0, 0
    start = time.perf_counter()
    end = start + seconds
    try:
        while (now := time.perf_counter()) < end:
            if rate:
                ahead = start + n / rate - now
                if ahead > 0:
                    time.sleep(ahead)
            os.pwrite(fd, block, offset)
            offset = (offset + BLOCK_BYTES) % FILE_BYTES
            n += 1
    finally:
        os.close(fd)
    counts.append(n)


def phase(name, seconds, files, rate=None):
    """One phase, a writer thread per file of `files`; returns the writes a second it reached."""
    queue = multiprocessing.Queue()
    spinners = [multiprocessing.Process(target=spin, args=(seconds, queue)) for _ in range(os.cpu_count() or 1)]
    counts = []
    threads = [
        threading.Thread(target=write, args=(path, seconds, counts, rate)) for path in files
    ]
    for p in spinners:
        p.start()
    for t in threads:
        t.start()
    gaps = [g for _ in spinners for g in queue.get(timeout=seconds + 60)]
    for p in spinners:
        p.join()
    for t in threads:
        t.join()
    stalled = sum(gaps) / (seconds * len(spinners))
    longest = max(gaps, default=0.0)
    writes_per_s = sum(counts) / seconds
    line = f"{name:6s} {len(spinners)} spinners"
    if files:
        line += f", {writes_per_s:.0f} {'paced page-cache' if rate else 'synced direct'} writes/s"
    print(f"{line}: {len(gaps)} gaps > {GAP_S * 1e3:.0f} ms, {100 * stalled:.1f}% of the time, longest {longest * 1e3:.1f} ms")
    return writes_per_s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary directory goes")
    args = parser.parse_args()
    if not (0 < args.seconds <= 600) or not (0 < args.writers <= 64):
        parser.error("--seconds must be in (0, 600] and --writers in 1..64")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        files = [os.path.join(directory, f"w{i}") for i in range(args.writers)]
        for path in files:
            prefill(path)
        try:
            write(files[0], 0.01, [])
        except OSError as e:
            raise SystemExit(f"no synced direct writes in {directory}: {e} (choose another file system with --dir)")
        phase("spin", args.seconds, [])
        synced = phase("synced", args.seconds, files)
        phase("cached", args.seconds, files, rate=max(synced, 1.0) / args.writers)
        phase("spin", args.seconds, [])


if __name__ == "__main__":
    main()
