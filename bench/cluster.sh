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
# Environment: BENCH_DIR (default /var/tmp/filepipe-bench, shared with compare.sh), RUNS (default 5)
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
BASE=${BENCH_DIR:-/var/tmp/filepipe-bench}
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

# Every comparison runs in rounds: one run of each command a round (hyperfine -r 1), their
# order swapped every other round. This VM's speed drifts by a third over minutes (a local
# batch's system time went from 0.3 s to 1.3 s in ten minutes, nothing else running): a block
# of runs of one command, then a block of the other, measured that drift as much as the
# difference between them. Each round's JSON is kept in $WORK/<name>-<round>-<command>.json.
once() { # once JSON-FILE NAME COMMAND
    hyperfine -N -r 1 -w 0 --style none --export-json "$1" -n "$2" "$3" >/dev/null
}
# The machine's busy and idle CPU seconds so far (all cores; idle counts iowait too).
machine() { awk -v tck="$(getconf CLK_TCK)" '/^cpu /{ printf "%.2f %.2f", ($2+$3+$4+$7+$8+$9) / tck, ($5+$6) / tck }' /proc/stat; }

echo "== overhead: one coordinator + one worker vs a local batch (machine: $(nproc) cores, $RUNS rounds)"
worker "$WORK/w-overhead.log"
BATCH_GZIP="$BIN batch $WORK/text --op gzip --force -q"
QUEUE_GZIP="$BIN batch $WORK/text --op gzip --force -q --queue $URL --root-name text"
BATCH_SHA="$BIN batch $WORK/small --op sha256 -q --manifest $WORK/m1"
QUEUE_SHA="$BIN batch $WORK/small --op sha256 -q --manifest $WORK/m2 --queue $URL --root-name small"
# Warm-up: the page cache, the outputs of --force in place, the worker's first pipeline.
for c in "$BATCH_GZIP" "$QUEUE_GZIP" "$BATCH_SHA" "$QUEUE_SHA"; do $c; done
for r in $(seq "$RUNS"); do
    pairs=("batch-gzip|$BATCH_GZIP" "queue-gzip|$QUEUE_GZIP" "batch-sha256|$BATCH_SHA" "queue-sha256|$QUEUE_SHA")
    ((r % 2)) || pairs=("${pairs[1]}" "${pairs[0]}" "${pairs[3]}" "${pairs[2]}")
    for p in "${pairs[@]}"; do once "$WORK/overhead-$r-${p%%|*}.json" "${p%%|*}" "${p#*|}"; done
done
stop_workers

echo "== scaling: one worker pinned to core 0, against it and a second pinned to core 1 ($RUNS rounds)"
worker "$WORK/w-pin0.log" taskset -c 0
$QUEUE_GZIP
first=${pids[0]}
for r in $(seq "$RUNS"); do
    for n in $( ((r % 2)) && echo 1 2 || echo 2 1); do
        if ((n == 2)); then worker "$WORK/w-pin1.log" taskset -c 1; fi
        before="$(cpus) $(machine)"
        once "$WORK/scaling-$r-$n.json" "$n" "$QUEUE_GZIP"
        after=$(machine) # first: cpus runs python, which the machine's count must not include
        echo "$before $(cpus) $after" >"$WORK/scaling-$r-$n.cpu"
        if ((n == 2)); then
            kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true; pids=("$first")
        fi
    done
done
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
import json, os, statistics, sys
w, runs = sys.argv[1], int(sys.argv[2])
def time(f):
    return json.load(open(os.path.join(w, f)))["results"][0]
def spread(xs):
    return f"{statistics.median(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f})"
for op in ("gzip", "sha256"):
    b = [time(f"overhead-{r}-batch-{op}.json")["mean"] for r in range(1, runs + 1)]
    q = [time(f"overhead-{r}-queue-{op}.json")["mean"] for r in range(1, runs + 1)]
    ratios = [x / y * 100 for x, y in zip(b, q)]
    print(f"overhead {op}: batch {spread(b)}, queue {spread(q)}: the queue runs at "
          f"{statistics.median(b) / statistics.median(q) * 100:.0f}% of batch's throughput "
          f"(round by round {min(ratios):.0f}-{max(ratios):.0f}%, median {statistics.median(ratios):.0f}%)")
one = [time(f"scaling-{r}-1.json")["mean"] for r in range(1, runs + 1)]
two = [time(f"scaling-{r}-2.json")["mean"] for r in range(1, runs + 1)]
ratios = [x / y for x, y in zip(one, two)]
print(f"scaling: 1 worker {spread(one)}, 2 workers {spread(two)}: "
      f"{statistics.median(one) / statistics.median(two):.2f}x "
      f"(round by round {min(ratios):.2f}-{max(ratios):.2f}x, median {statistics.median(ratios):.2f}x)")
# Where the ceiling is: every process shares the machine's cores, so a run cannot take less
# than all the CPU the machine spends in it (workers, nats-server, coordinator, and the
# kernel's write-back threads) over the cores there are. The machine's idle time during a
# 2-worker run is what that run left unused.
cores = len(os.sched_getaffinity(0))  # as nproc counts them
for n, label in ((1, "1 worker"), (2, "2 workers")):
    rows = []
    for r in range(1, runs + 1):
        n0, w0, b0, i0, n1, w1, b1, i1 = map(float, open(os.path.join(w, f"scaling-{r}-{n}.cpu")).read().split())
        t = time(f"scaling-{r}-{n}.json")
        rows.append((w1 - w0, n1 - n0, t["user"] + t["system"], b1 - b0, i1 - i0))
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"  {label}, medians per run: CPU of workers {med[0]:.3f} s, nats-server {med[1]:.3f} s, "
          f"coordinator {med[2]:.3f} s; the machine busy {med[3]:.2f} s, idle {med[4]:.2f} s "
          f"on {cores} cores")
    if n == 1:
        busy_one = med[3]
    else:
        print(f"  so at best {statistics.median(one) / (busy_one / cores):.2f}x on this machine "
              f"(a 1-worker run's busy CPU over {cores} cores)")
PY
