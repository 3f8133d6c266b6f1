#!/usr/bin/env bash
# Cluster mode's cost and reach, side by side in one run (issue 17):
#   overhead    one coordinator + one worker through a local nats-server, against a local
#               batch on the same tree: gzip -6 over the 2,000-file text tree, sha256 over
#               the 50,000 small files (hyperfine, --force so every run does the work)
#   scaling     the text tree with one worker pinned to one core (taskset), then two workers
#               pinned to a core each; the coordinator runs unpinned
#   redelivery  a worker SIGKILLed while it holds jobs: seconds from the kill until another
#               worker has finished them (the ack wait is 30 s)
#
# usage: bench/cluster.sh [--quick] [FILEPIPE_BIN]      (needs nats-server, hyperfine, taskset)
# Environment: BENCH_DIR (default /tmp/filepipe-bench, shared with compare.sh), RUNS (default 5)
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")
QUICK=0
BIN=""
for a in "$@"; do
    case $a in
        --quick) QUICK=1 ;;
        *) BIN=$a ;;
    esac
done
BIN=${BIN:-$REPO_ROOT/target/release/filepipe}
BASE=${BENCH_DIR:-/tmp/filepipe-bench}
RUNS=${RUNS:-5}
((QUICK)) && RUNS=2
for t in nats-server hyperfine taskset; do
    command -v "$t" >/dev/null || { echo "cluster.sh: needs $t" >&2; exit 2; }
done
[[ -x $BIN ]] || { echo "cluster.sh: no binary $BIN (cargo build --release)" >&2; exit 2; }

gen=("$BASE/corpus" --only text,small)
((QUICK)) && gen+=(--quick)
python3 "$SCRIPT_DIR/gen_corpus.py" "${gen[@]}" >&2
WORK=$BASE/cluster
rm -rf "$WORK"
mkdir -p "$WORK"
cp -al "$BASE/corpus/text" "$WORK/text"
cp -al "$BASE/corpus/small" "$WORK/small"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=nats://127.0.0.1:$port
nats-server -js -a 127.0.0.1 -p "$port" -sd "$WORK/store" >"$WORK/nats.log" 2>&1 &
NATS=$!
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    kill "$NATS" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
    sleep 0.05
done

# A worker, in the background until this script ends; waits until it is bound (READY=1 is
# for systemd; here its log line says so).
worker() { # worker LOG CMD-PREFIX...
    local log=$1; shift
    "$@" "$BIN" worker --queue "$URL" --root text="$WORK/text" --root small="$WORK/small" \
        >"$log" 2>&1 &
    pids+=($!)
    for _ in $(seq 200); do grep -q "worker ready" "$log" && return 0; sleep 0.05; done
    echo "cluster.sh: the worker did not start: $(cat "$log")" >&2; exit 1
}
# CPU seconds a process has used so far (user + system).
cpu() { awk -v tck="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / tck }' "/proc/$1/stat"; }
# CPU seconds of nats-server and of every worker so far: "NATS WORKERS".
cpus() {
    local w=0 p
    for p in "${pids[@]}"; do w=$(python3 -c "print($w + $(cpu "$p"))"); done
    echo "$(cpu "$NATS") $w"
}
stop_workers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait "${pids[@]}" 2>/dev/null || true; pids=(); }

echo "== overhead: one coordinator + one worker vs a local batch (machine: $(nproc) cores)"
worker "$WORK/w-overhead.log"
hyperfine -N -w 1 -r "$RUNS" --export-json "$WORK/overhead-gzip.json" \
    -n "batch gzip" "$BIN batch $WORK/text --op gzip --force -q" \
    -n "queue gzip" "$BIN batch $WORK/text --op gzip --force -q --queue $URL --root-name text"
hyperfine -N -w 1 -r "$RUNS" --export-json "$WORK/overhead-sha256.json" \
    -n "batch sha256" "$BIN batch $WORK/small --op sha256 -q --manifest $WORK/m1" \
    -n "queue sha256" "$BIN batch $WORK/small --op sha256 -q --manifest $WORK/m2 --queue $URL --root-name small"
stop_workers

echo "== scaling: workers pinned to one core each"
worker "$WORK/w-pin0.log" taskset -c 0
before=$(cpus)
hyperfine -N -w 1 -r "$RUNS" --export-json "$WORK/scaling-1.json" \
    -n "1 worker, 1 core" "$BIN batch $WORK/text --op gzip --force -q --queue $URL --root-name text"
echo "$before $(cpus)" >"$WORK/scaling-1.cpu"
worker "$WORK/w-pin1.log" taskset -c 1
before=$(cpus)
hyperfine -N -w 1 -r "$RUNS" --export-json "$WORK/scaling-2.json" \
    -n "2 workers, 1 core each" "$BIN batch $WORK/text --op gzip --force -q --queue $URL --root-name text"
echo "$before $(cpus)" >"$WORK/scaling-2.cpu"
stop_workers

echo "== redelivery: a worker killed while it holds jobs"
worker "$WORK/w-doomed.log"
doomed=${pids[0]}
"$BIN" batch "$WORK/text" --op gzip --force -q --level 9 --queue "$URL" --root-name text &
coordinator=$!
# Once it has taken jobs (a temp of its is open), kill it and start another.
for _ in $(seq 400); do
    ls -l "/proc/$doomed/fd" 2>/dev/null | grep -q "$WORK/text" && break
    sleep 0.01
done
kill -9 "$doomed"
killed=$(date +%s.%N)
pids=()
worker "$WORK/w-rescue.log"
wait "$coordinator"
finished=$(date +%s.%N)
python3 -c "print(f'redelivery: {float($finished) - float($killed):.1f} s from the kill to the run done (ack wait 30 s)')"

python3 - "$WORK" "$RUNS" <<'PY'
import json, sys, os
w = sys.argv[1]
def med(f, name):
    for r in json.load(open(os.path.join(w, f)))["results"]:
        if r["command"] == name:
            return r["median"], min(r["times"]), max(r["times"])
for op, f in (("gzip", "overhead-gzip.json"), ("sha256", "overhead-sha256.json")):
    b, q = med(f, f"batch {op}"), med(f, f"queue {op}")
    print(f"overhead {op}: batch {b[0]:.3f} s ({b[1]:.3f}-{b[2]:.3f}), queue {q[0]:.3f} s "
          f"({q[1]:.3f}-{q[2]:.3f}): the queue runs at {b[0] / q[0] * 100:.0f}% of batch's throughput")
one, two = med("scaling-1.json", "1 worker, 1 core"), med("scaling-2.json", "2 workers, 1 core each")
print(f"scaling: 1 worker {one[0]:.3f} s, 2 workers {two[0]:.3f} s: {one[0] / two[0]:.2f}x")
# Where the ceiling is on this machine: every process shares its cores, so a run cannot take
# less than all the CPU it uses (workers, nats-server, coordinator) over the cores there are.
runs = int(sys.argv[2]) + 1  # hyperfine's warm-up run counts too
cores = len(os.sched_getaffinity(0))  # as nproc counts them
for label, f, name in (("1 worker", "scaling-1", "1 worker, 1 core"),
                       ("2 workers", "scaling-2", "2 workers, 1 core each")):
    n0, w0, n1, w1 = map(float, open(os.path.join(w, f + ".cpu")).read().split())
    r = [r for r in json.load(open(os.path.join(w, f + ".json")))["results"] if r["command"] == name][0]
    coord = r["user"] + r["system"]
    nats, workers = (n1 - n0) / runs, (w1 - w0) / runs
    total = nats + workers + coord
    print(f"  {label}: CPU per run: workers {workers:.3f} s, nats-server {nats:.3f} s, "
          f"coordinator {coord:.3f} s; total {total:.3f} s, at best {total / cores:.3f} s "
          f"on {cores} cores")
    if label == "2 workers":
        print(f"  so at best {one[0] / (total / cores):.2f}x on this machine")
PY
