#!/usr/bin/env bash
# Cluster mode's instructions per file, counted by callgrind (repeatable whatever the load on a
# shared machine, where wall times are not): N files of the small corpus (default 4,000),
# --op sha256, one coordinator and one worker (--jobs 1) through a local nats-server.
#   worker       run under callgrind throughout; its counters are zeroed after a warm-up run
#                of the same batch, then dumped after the measured one
#   coordinator  the measured batch run whole under callgrind
# Prints each one's instructions per file; the worker's also without hashing (the self cost
# of every sha2:: function: valgrind's CPU has no SHA extensions, so hashing dominates).
# The two runs' manifests must be equal, and they are checked with sha256sum -c.
#
# usage: bench/callgrind.sh [FILEPIPE_BIN]      (needs nats-server, valgrind; a release build)
# Environment: BENCH_DIR (default /var/tmp/filepipe-bench, shared with cluster.sh), N (default 4000)
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")
BIN=${1:-$REPO_ROOT/target/release/filepipe}
BASE=${BENCH_DIR:-/var/tmp/filepipe-bench}
N=${N:-4000}
for t in nats-server valgrind callgrind_control callgrind_annotate sha256sum; do
    command -v "$t" >/dev/null || { echo "callgrind.sh: needs $t" >&2; exit 2; }
done
[[ -x $BIN ]] || { echo "callgrind.sh: no binary $BIN (cargo build --release)" >&2; exit 2; }

python3 "$SCRIPT_DIR/gen_corpus.py" "$BASE/corpus" --only small >&2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/filepipe-callgrind.XXXXXX")
mkdir -p "$WORK/tree"
# The first N files in byte order, hard-linked (hashing writes nothing next to them).
(cd "$BASE/corpus/small" && find . -type f | LC_ALL=C sort >"$WORK/all")
head -n "$N" "$WORK/all" | while IFS= read -r f; do
    mkdir -p "$WORK/tree/$(dirname "$f")"
    ln "$BASE/corpus/small/$f" "$WORK/tree/$f"
done

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=nats://127.0.0.1:$port
nats-server -js -a 127.0.0.1 -p "$port" -sd "$WORK/store" >"$WORK/nats.log" 2>&1 &
NATS=$!
WORKER=""
cleanup() {
    [[ -n $WORKER ]] && kill "$WORKER" 2>/dev/null || true
    kill "$NATS" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
    sleep 0.05
done

valgrind --tool=callgrind --callgrind-out-file="$WORK/worker.out" \
    "$BIN" worker --queue "$URL" --root small="$WORK/tree" --jobs 1 >"$WORK/worker.log" 2>&1 &
WORKER=$!
for _ in $(seq 1200); do grep -q "worker ready" "$WORK/worker.log" && break; sleep 0.1; done
grep -q "worker ready" "$WORK/worker.log" || { echo "the worker did not start: $(cat "$WORK/worker.log")" >&2; exit 1; }

batch() { # batch MANIFEST [prefix...]
    local m=$1; shift
    "$@" "$BIN" batch "$WORK/tree" --op sha256 -q --manifest "$m" --queue "$URL" --root-name small
}
batch "$WORK/warmup.sums"
callgrind_control -z "$WORKER" >/dev/null
batch "$WORK/measured.sums" valgrind --tool=callgrind --callgrind-out-file="$WORK/coordinator.out" 2>"$WORK/coordinator.log"
callgrind_control -d "$WORKER" >/dev/null
cmp "$WORK/warmup.sums" "$WORK/measured.sums"
(cd "$WORK/tree" && sha256sum -c --quiet "$WORK/measured.sums")
[[ $(wc -l <"$WORK/measured.sums") -eq $N ]] || { echo "the manifest does not list $N files" >&2; exit 1; }

# The worker's dump after the measured run: the newest of its numbered dumps.
dump=$(ls -t "$WORK"/worker.out.* | sed -n 1p)
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !n { gsub(",", "", $1); print $1; n = 1 }'; }
hashing() {
    callgrind_annotate --threshold=100 "$1" 2>/dev/null |
        awk '/sha2::/ { v = $1; gsub(",", "", v); if (v ~ /^[0-9]+$/) s += v } END { printf "%.0f\n", s }'
}
w=$(total "$dump")
h=$(hashing "$dump")
c=$(total "$WORK/coordinator.out")
python3 - "$N" "$w" "$h" "$c" <<'PY'
import sys
n, w, h, c = (int(x) for x in sys.argv[1:])
print(f"files: {n}")
print(f"worker: {w / 1e6:.1f} M instructions, of which hashing (sha2::) {h / 1e6:.1f} M: "
      f"{(w - h) / n / 1e3:.1f} k a file besides hashing")
print(f"coordinator: {c / 1e6:.1f} M instructions: {c / n / 1e3:.1f} k a file")
PY
echo "callgrind outputs: $WORK" >&2
