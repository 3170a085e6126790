#!/usr/bin/env python3
"""Compare two builds of ringkv on real dev clusters, interleaved, run by run.

On a shared machine the speed drifts by more than most changes are worth, so a claim
that B is cheaper than A needs runs of both taken close together, many times. Each round
runs A and B once each (the order alternates between rounds). Each run:
- starts a fresh 3-node `ringkv-node dev` cluster from that build's binaries (loopback only,
  in a temporary directory);
- runs `ringkv bench` with that build's CLI: 16 clients by default, 100-byte values,
  1000 keys preloaded first;
- reads the nodes' CPU time (from /proc) and the bench's own CPU time;
- counts the nodes' context switches (all their threads) and the UDP datagrams sent on the
  machine (/proc/net/snmp: every process's, so keep other UDP traffic off the machine).

Per run it prints throughput, p99, node and client CPU, datagrams and the nodes' context
switches, all per request (the preload's writes counted as requests too): a change that
costs less CPU usually shows why in one of the last two. At the end come each build's medians, and in how many
rounds B used less CPU than A.

Usage, from the project root:
    benches/cluster_ab.py DIR_A DIR_B [--workload a] [--rounds 8] [--ops 20000] [--clients 16]
where each DIR holds a build's `ringkv-node` and `ringkv` (copy target/release/ aside
before changing the code).
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

STARTUP_TRIES = 120  # half-second waits for a new cluster to take a write
STOP_WAIT_S = 30


def node_pids(dev_dir):
    """The node processes of the dev cluster in dev_dir (found by their config paths)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ringkv-node" in cmd and f"--config {dev_dir}/" in cmd:
            pids.append(int(entry))
    return pids


def cpu_seconds(pids):
    """User plus system CPU seconds of these processes, all their threads."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def context_switches(pids):
    """Voluntary plus involuntary context switches of these processes, all their threads."""
    switches = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
            except OSError:
                continue  # a thread that ended meanwhile
    return switches


def udp_datagrams_sent():
    """UDP datagrams sent on this machine so far (OutDatagrams of /proc/net/snmp)."""
    with open("/proc/net/snmp") as f:
        udp = [line.split() for line in f if line.startswith("Udp:")]
    return int(udp[1][udp[0].index("OutDatagrams")])


def children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(bin_dir, args):
    node, cli = os.path.join(bin_dir, "ringkv-node"), os.path.join(bin_dir, "ringkv")
    with tempfile.TemporaryDirectory(prefix="ringkv-ab-") as d:
        dev_dir = os.path.join(d, "dev")
        with open(os.path.join(d, "dev.log"), "w") as log:
            dev = subprocess.Popen([node, "dev", "--nodes", "3", "--dir", dev_dir], stdout=log, stderr=log)
        try:
            config = os.path.join(dev_dir, "n1.toml")
            for _ in range(STARTUP_TRIES):
                if os.path.exists(config):
                    put = subprocess.run([cli, "--config", config, "put", "warmup", "x"], capture_output=True)
                    if put.returncode == 0:
                        break
                time.sleep(0.5)
            else:
                sys.exit(f"the cluster of {bin_dir} did not start; see its log")
            pids = node_pids(dev_dir)
            nodes_before, client_before = cpu_seconds(pids), children_cpu_seconds()
            switches_before, datagrams_before = context_switches(pids), udp_datagrams_sent()
            bench = subprocess.run(
                [cli, "--config", config, "--json", "bench", "--workload", args.workload,
                 "--clients", str(args.clients), "--ops", str(args.ops), "--value-size", "100"],
                capture_output=True,
            )
            nodes_s, client_s = cpu_seconds(pids) - nodes_before, children_cpu_seconds() - client_before
            switches = context_switches(pids) - switches_before
            datagrams = udp_datagrams_sent() - datagrams_before
        finally:
            dev.send_signal(signal.SIGINT)
            try:
                dev.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                dev.kill()
                dev.wait()
    doc = json.loads(bench.stdout or b"null") or {}
    requests = max(doc.get("ops", 0) + doc.get("keys", 0), 1)
    return {
        "ops_per_sec": doc.get("ops_per_sec", 0.0),
        "p99_ms": doc.get("latency_ms", {}).get("p99", 0.0),
        "errors": doc.get("errors", "?"),
        "node_us": nodes_s * 1e6 / requests,
        "client_us": client_s * 1e6 / requests,
        "datagrams": datagrams / requests,
        "switches": switches / requests,
    }


MEASURES = ("ops_per_sec", "p99_ms", "node_us", "client_us", "datagrams", "switches")


def figures(x):
    """One run's measures (or their medians), as a line shows them."""
    return (f"{x['ops_per_sec']:.0f} ops/s, p99 {x['p99_ms']:.2f} ms, node {x['node_us']:.1f} us/op, "
            f"client {x['client_us']:.1f} us/op, datagrams {x['datagrams']:.2f}/op, "
            f"node switches {x['switches']:.2f}/op")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--workload", default="a", choices=["a", "b", "c", "f"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--ops", type=int, default=20000)
    p.add_argument("--clients", type=int, default=16)
    args = p.parse_args()
    if not 1 <= args.rounds <= 1000:
        sys.exit("--rounds must be 1 to 1000")
    for d in (args.dir_a, args.dir_b):
        for b in ("ringkv-node", "ringkv"):
            if not os.access(os.path.join(d, b), os.X_OK):
                sys.exit(f"{d} has no executable {b}")
    runs = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            x = run_once(args.dir_a if name == "A" else args.dir_b, args)
            runs[name].append(x)
            print(f"round {r + 1} {name}: {figures(x)}, errors {x['errors']}", flush=True)
    for name, xs in runs.items():
        med = {k: statistics.median(x[k] for x in xs) for k in MEASURES}
        print(f"{name} medians over {len(xs)} runs: {figures(med)}")
    pairs = list(zip(runs["A"], runs["B"]))
    for k, what in (("node_us", "node CPU"), ("client_us", "client CPU")):
        print(f"B used less {what} than A in {sum(b[k] < a[k] for a, b in pairs)} of {len(pairs)} rounds")


if __name__ == "__main__":
    main()
