#!/usr/bin/env python3
"""Run a sharded frontier search (`relucompile pareto --shard I/N`) on a HyperQueue
LocalCluster on this machine, then merge the shards into DIR's frontier files.

W workers of C cores each run the N shards, one shard per worker at a time, with
RAYON_NUM_THREADS=C so that the shards share the cores instead of oversubscribing them.
Each shard's output goes to DIR/hq-logs/shard-I.{out,err}; when every shard succeeded,
`relucompile pareto MODEL -o DIR EXTRA... --merge` writes the frontier. Flags after `--`
go to both the shards and the merge (they must be the same for both).

    cargo build --release
    python3 scripts/frontier_hyperqueue.py models/resnet18w16.onnx -o frontier \\
        --shards 4 --workers 2 -- --finetune-epochs 2

Exit status: the merge's (0 when the frontier is written), 1 when a shard failed (its
stderr's tail is printed; rerun the same command and the shards resume), 2 for a usage
error or a missing `hyperqueue` package, 130 when interrupted. A failed shard does not
cancel the others: what they finish is kept for the rerun.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDERR_TAIL = 20  # lines of a failed shard's stderr to print

# Runs one shard as a child and writes {start, end, seconds, exit} to argv[1], so the
# driver can report the seconds each shard ran (HyperQueue's Python API gives no task
# times). HyperQueue kills a task's whole process group, so the child never outlives it.
TIMED = """\
import json, subprocess, sys, time
start = time.time()
rc = subprocess.call(sys.argv[2:])
end = time.time()
rc = rc if rc >= 0 else 128 - rc
with open(sys.argv[1], "w") as f:
    json.dump({"start": start, "end": end, "seconds": end - start, "exit": rc}, f)
sys.exit(rc)
"""


# Set by Ctrl-C/SIGTERM; the wait loop then leaves the cluster's `with`, which stops it.
stop = threading.Event()


def on_signal(_signum, _frame):
    stop.set()


def default_binary():
    built = os.path.join(ROOT, "target", "release", "relucompile")
    return built if os.path.isfile(built) else "relucompile"


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s MODEL -o DIR --shards N [--workers W] [--cores-per-worker C] "
        "[--relucompile PATH] [--json] [-- EXTRA PARETO FLAGS...]",
    )
    ap.add_argument("model", metavar="MODEL", help="the ONNX model to reduce")
    ap.add_argument("-o", "--output", metavar="DIR", required=True, help="the search directory (the shards' and the frontier's)")
    ap.add_argument("--shards", metavar="N", type=int, required=True, help="how many shards to split the search into")
    ap.add_argument("--workers", metavar="W", type=int, default=2, help="HyperQueue workers, each running one shard at a time (default: 2)")
    ap.add_argument("--cores-per-worker", metavar="C", type=int, help="cores per worker, also each shard's RAYON_NUM_THREADS (default: cpu_count // W, at least 1)")
    ap.add_argument("--relucompile", metavar="PATH", default=default_binary(), help="the binary (default: target/release/relucompile if built, else `relucompile` on PATH)")
    ap.add_argument("--json", action="store_true", help="print {shards: [{index, seconds, exit}], merge_seconds, merge_exit, total_seconds} instead of the table")
    # Everything after `--` is for relucompile; argparse must not see it.
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    args.extra = extra
    if args.shards < 1 or args.workers < 1 or (args.cores_per_worker is not None and args.cores_per_worker < 1):
        ap.error("--shards, --workers and --cores-per-worker must be at least 1")
    if args.cores_per_worker is None:
        args.cores_per_worker = max(1, (os.cpu_count() or 1) // args.workers)
    for flag in extra:
        name = flag.split("=", 1)[0]
        if name in ("--shard", "--shards", "--merge", "-o", "--output"):
            ap.error(f"`{name}` after `--`: this script passes -o, --shard and --merge itself")
    binary = shutil.which(args.relucompile)
    if binary is None:
        ap.error(f"no relucompile binary at `{args.relucompile}`: run `cargo build --release` or give --relucompile PATH")
    args.relucompile = os.path.abspath(binary)
    return args


def tail(path, lines):
    try:
        with open(path, errors="replace") as f:
            text = f.read().rstrip("\n").splitlines()
    except OSError:
        return "(no stderr file)"
    return "\n".join(text[-lines:]) if text else "(stderr is empty)"


def load_hyperqueue():
    # tqdm's bar (in Client.wait_for_jobs) only on a terminal; it reads TQDM_* at import.
    if not sys.stderr.isatty():
        os.environ["TQDM_DISABLE"] = "1"
    try:
        import hyperqueue
        from hyperqueue.cluster import WorkerConfig
        from hyperqueue.ffi.protocol import ResourceRequest
    except ImportError:
        print("error: the `hyperqueue` Python package is missing: pip install hyperqueue", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop("TQDM_DISABLE", None)
    return hyperqueue.Job, hyperqueue.LocalCluster, WorkerConfig, ResourceRequest


def run_shards(args, logs, hq):
    """Runs the N shards on a LocalCluster; returns ({index: HyperQueue's error message} for
    the shards that failed, whether Ctrl-C/SIGTERM stopped the run)."""
    Job, LocalCluster, WorkerConfig, ResourceRequest = hq
    cwd = os.getcwd()  # MODEL, DIR and EXTRA paths stay relative to where the script ran
    job = Job(name="relucompile-pareto", max_fails=None)  # a failed shard leaves the others running
    for i in range(args.shards):
        cmd = [args.relucompile, "pareto", args.model, "-o", args.output, "--shard", f"{i}/{args.shards}", *args.extra]
        job.program(
            [sys.executable, "-c", TIMED, os.path.join(logs, f"shard-{i}.time"), *cmd],
            name=f"shard-{i}",
            cwd=cwd,
            env={"RAYON_NUM_THREADS": str(args.cores_per_worker)},
            stdout=os.path.join(logs, f"shard-{i}.out"),
            stderr=os.path.join(logs, f"shard-{i}.err"),
            # A shard takes a whole worker, so each worker runs one at a time.
            resources=ResourceRequest(cpus=args.cores_per_worker),
        )

    outcome = {}
    # The server and workers run as threads of this process and write to its stdout: drop
    # the server's start banner, send anything else to stderr (--json's stdout is JSON).
    saved_stdout = os.dup(1)
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    try:
        with tempfile.TemporaryDirectory(prefix="hq-server-") as server_dir:
            cluster = LocalCluster(server_dir=server_dir)
            os.dup2(2, 1)
            with cluster:
                # Each worker makes a socket in TMPDIR that stopping leaves behind: put it in
                # the server directory, removed below. Tasks start later, with TMPDIR as it was.
                tmpdir = os.environ.get("TMPDIR")
                os.environ["TMPDIR"] = server_dir
                try:
                    for _ in range(args.workers):
                        cluster.start_worker(WorkerConfig(cores=args.cores_per_worker))
                finally:
                    if tmpdir is None:
                        del os.environ["TMPDIR"]
                    else:
                        os.environ["TMPDIR"] = tmpdir
                client = cluster.client()
                submitted = client.submit(job)

                # wait_for_jobs blocks in native code, where Python's signal handlers cannot
                # run: wait in a thread so Ctrl-C/SIGTERM reach this one and stop the cluster.
                def wait():
                    try:
                        outcome["ok"] = client.wait_for_jobs([submitted], raise_on_error=False)
                        if not outcome["ok"]:
                            outcome["failed"] = client.get_failed_tasks(submitted)
                    except BaseException as e:  # the server went away (it stops on SIGINT)
                        outcome["error"] = e

                waiter = threading.Thread(target=wait, daemon=True)
                waiter.start()
                while waiter.is_alive() and not stop.is_set():
                    waiter.join(0.2)
            # The cluster is stopped (its tasks killed): let the waiter see it and return.
            waiter.join(5)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)

    # HyperQueue's server also stops itself on SIGINT, which ends the wait with an error.
    interrupted = stop.is_set()
    if "error" in outcome and not interrupted:
        print(f"error: HyperQueue stopped before the shards finished: {outcome['error']}", file=sys.stderr)
        sys.exit(1)
    failed = {tid: ctx.error for tid, ctx in outcome.get("failed", {}).items()}
    return failed, interrupted


def read_time(logs, i):
    try:
        with open(os.path.join(logs, f"shard-{i}.time")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    started = time.time()
    args = parse_args()
    hq = load_hyperqueue()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    logs = os.path.abspath(os.path.join(args.output, "hq-logs"))
    os.makedirs(logs, exist_ok=True)
    for i in range(args.shards):  # no stale times from an earlier run
        try:
            os.remove(os.path.join(logs, f"shard-{i}.time"))
        except FileNotFoundError:
            pass

    failed, interrupted = run_shards(args, logs, hq)

    shards = []
    for i in range(args.shards):
        t = read_time(logs, i)
        shards.append({
            "index": i,
            "seconds": round(t["seconds"], 3) if t else None,
            "exit": t["exit"] if t else None,  # None: killed, or never started
        })

    report = {"shards": shards, "merge_seconds": None, "merge_exit": None, "total_seconds": None}
    code = 0
    if interrupted:
        print("interrupted: the cluster was stopped; rerun the same command to resume the shards", file=sys.stderr)
        code = 130
    elif failed or any(s["exit"] != 0 for s in shards):
        for s in shards:
            if s["exit"] == 0:
                continue
            why = failed.get(s["index"]) or f"exit {s['exit']}"
            err = os.path.join(logs, f"shard-{s['index']}.err")
            print(f"shard {s['index']}/{args.shards} failed: {why}\n--- the end of {err}:", file=sys.stderr)
            print(tail(err, STDERR_TAIL), file=sys.stderr)
        print("the merge did not run; fix the failure and rerun the same command (finished work is kept)", file=sys.stderr)
        code = 1
    else:
        merge = [args.relucompile, "pareto", args.model, "-o", args.output, *args.extra, "--merge"]
        t0 = time.time()
        # With --json our stdout is the report, so the merge's own output goes to stderr.
        code = subprocess.call(merge, stdout=sys.stderr if args.json else None)
        report["merge_seconds"] = round(time.time() - t0, 3)
        report["merge_exit"] = code
        if stop.is_set():
            code = 130
        elif code != 0:
            print(f"the merge exited {code}: {' '.join(merge)}", file=sys.stderr)
    report["total_seconds"] = round(time.time() - started, 3)

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{'':8}{'seconds':>9}{'exit':>6}")
        for s in shards:
            print(f"{'shard ' + str(s['index']):8}{fmt(s['seconds']):>9}{'-' if s['exit'] is None else s['exit']:>6}")
        if report["merge_exit"] is not None:
            print(f"{'merge':8}{fmt(report['merge_seconds']):>9}{report['merge_exit']:>6}")
        print(f"{'total':8}{fmt(report['total_seconds']):>9}")
    sys.exit(code)


if __name__ == "__main__":
    main()
