#!/usr/bin/env python3
"""Deterministic benchmark corpus generator for filepipe (stdlib only).

Usage:
    bench/gen_corpus.py DIR [--quick] [--only small,large,text,src,one,onebin,huge] [--force]

Creates DIR/<corpus>/ for each corpus below. Every run with the same
preset writes the same bytes (fixed seeds; only random.Random's
seeded Mersenne Twister and hashlib are used, both stable across CPython 3.x),
except `onebin`, which is the machine's own machine code: the same bytes on
the same OS image (its stamp's fingerprint tells), not across distributions.

Corpora (full preset; --quick makes tiny versions for smoke tests):
  small  ~50,000 files, ~16 KiB each (log-normal), ~800 MB, nested dirs,
         mixed content: log text, incompressible random, low-entropy binary,
         half/half mixes.
  large  4 x 256 MiB files, moderately compressible (~2x): 1 MiB chunks of
         text / low-entropy binary / random.
  text   2,000 log-like text files, ~200 MB total, gzip -6 ratio ~4-6x.
  src    8,000 C-like source files of 2-64 KiB (log-uniform, ~142 MiB) in 100
         dirs: functions, comments, structs and macros composed from a
         vocabulary of identifiers, gzip -6 ratio ~3.6x, like a tree of
         kernel headers. The small-file tree outputs are written next to.
  one    one 256 MiB log-like text file (one/big.log).
  onebin one 240 MB file of real machine code (onebin/big.bin): the ELF files
         under /usr/lib*, /usr/bin, /usr/sbin and /usr/libexec, in path
         order, concatenated. What the issue's per-core figures were measured
         on ("a 200 MB binary"); no generator makes realistic machine code.
  huge   200,000 tiny files (0-1 KiB) in 400 dirs, for peak-memory tests.

A corpus is skipped when DIR/.stamps/<corpus>.json exists and records the
same parameters; a partially written corpus (no stamp) is deleted and
regenerated. Each stamp records file count, total bytes and a SHA-256
fingerprint over (path, size, content) so two machines can check they
benchmark identical data.

Content is built from a few pools generated once (a pool of ~300k distinct
log-line bodies, a day of monotonic timestamps, random and low-entropy byte
blobs); files are composed by slicing/joining those pools, so there are no
per-byte Python loops.
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import stat
import sys
import time

GEN_VERSION = 1
MiB = 1 << 20

PRESETS = {
    "full": {
        "small": {"files": 50_000, "mean": 16 * 1024, "sigma": 0.6,
                  "min": 256, "max": 256 * 1024, "seed": 101},
        "large": {"files": 4, "size": 256 * MiB, "seed": 202},
        "text": {"files": 2_000, "mean": 100_000, "sigma": 0.8,
                 "min": 2_000, "max": 2_000_000, "seed": 303},
        "src": {"files": 8_000, "min": 2 * 1024, "max": 64 * 1024, "seed": 606},
        "one": {"size": 256 * MiB, "seed": 404},
        "onebin": {"size": 240_000_000},
        "huge": {"files": 200_000, "max": 1024, "seed": 505},
    },
    "quick": {
        "small": {"files": 2_000, "mean": 16 * 1024, "sigma": 0.6,
                  "min": 256, "max": 256 * 1024, "seed": 101},
        "large": {"files": 4, "size": 16 * MiB, "seed": 202},
        "text": {"files": 100, "mean": 100_000, "sigma": 0.8,
                 "min": 2_000, "max": 2_000_000, "seed": 303},
        "src": {"files": 400, "min": 2 * 1024, "max": 64 * 1024, "seed": 606},
        "one": {"size": 32 * MiB, "seed": 404},
        "onebin": {"size": 32 * MiB},
        "huge": {"files": 5_000, "max": 1024, "seed": 505},
    },
}
ORDER = ["small", "large", "text", "src", "one", "onebin", "huge"]
# Where `onebin` takes its machine code from, in this order.
BIN_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/bin", "/usr/sbin",
            "/usr/libexec"]

# --------------------------------------------------------------------------
# Vocabulary for log-like text
# --------------------------------------------------------------------------
LEVELS = ["INFO"] * 14 + ["DEBUG"] * 4 + ["WARN"] * 2 + ["ERROR"]
COMPONENTS = [
    "http.server", "http.client", "db.pool", "db.query", "auth", "auth.oauth",
    "cache.redis", "cache.local", "scheduler", "worker", "queue.consumer",
    "queue.producer", "storage.s3", "storage.local", "billing", "mailer",
    "search.indexer", "search.query", "metrics", "gc", "config", "ratelimit",
    "grpc.gateway", "session", "uploader", "thumbnailer", "notifier",
    "feature-flags", "audit", "healthcheck",
]
METHODS = ["GET"] * 8 + ["POST"] * 3 + ["PUT", "DELETE", "PATCH", "HEAD"]
RESOURCES = [
    "users", "orders", "items", "carts", "invoices", "sessions", "products",
    "reviews", "search", "images", "reports", "accounts", "payments",
    "shipments", "notifications", "settings", "tokens", "events",
]
SUBRES = ["", "", "", "/items", "/history", "/avatar", "/status", "/comments",
          "/refunds", "/lines", "/preview", "/export"]
STATUSES = [200] * 20 + [201, 204, 204, 301, 302, 304, 304, 400, 401, 403,
                         404, 404, 409, 422, 429, 500, 502, 503]
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15",
    "curl/7.88.1", "python-requests/2.31.0", "Go-http-client/1.1",
    "okhttp/4.12.0", "PostmanRuntime/7.36.0", "kube-probe/1.28",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
]
TABLES = ["users", "orders", "order_lines", "products", "inventory", "sessions",
          "payments", "audit_log", "events", "feature_flags", "coupons"]
HOSTS = ["api.internal", "payments.internal", "search-3.internal",
         "auth.internal", "10.12.0.7:8443", "inventory.svc.cluster.local",
         "redis-primary:6379", "pg-replica-2:5432", "mail.internal:25"]
WORDS = (
    "the a request response timeout retry connection closed reset peer upstream "
    "downstream worker job task queue batch record rows bytes cache miss hit "
    "expired token invalid missing permission denied user account order item "
    "payment refund invoice shipment failed succeeded started finished skipped "
    "scheduled delayed throttled slow fast healthy unhealthy degraded recovered "
    "primary replica leader follower election snapshot compaction checkpoint "
    "index shard segment merge flush commit rollback deadlock lock acquired "
    "released waiting pool exhausted limit exceeded config reload signal "
    "received shutting down listening on port certificate expires soon"
).split()
ERRORS = [
    "connection reset by peer", "context deadline exceeded", "i/o timeout",
    "no such host", "broken pipe", "EOF", "too many open files",
    "permission denied", "duplicate key value violates unique constraint",
    "could not serialize access due to concurrent update",
    "certificate has expired or is not yet valid", "quota exceeded",
]
FUNCS = ["handle_request", "process_batch", "run_job", "fetch_user",
         "commit_tx", "encode_response", "resize_image", "send_email",
         "refresh_token", "apply_migration", "render_template", "index_doc"]


def _hex(rng, n):
    return "%0*x" % (n, rng.getrandbits(4 * n))


def _ip(rng):
    if rng.random() < 0.6:
        return "10.%d.%d.%d" % (rng.randrange(0, 32), rng.randrange(256),
                                rng.randrange(1, 255))
    return "%d.%d.%d.%d" % (rng.randrange(1, 224), rng.randrange(256),
                            rng.randrange(256), rng.randrange(1, 255))


def make_body(rng):
    """One log line body (after the timestamp), newline-terminated."""
    lvl = rng.choice(LEVELS)
    comp = rng.choice(COMPONENTS)
    k = rng.randrange(100)
    if rng.random() < 0.2:
        # Probes and scrapes: the near-identical lines real logs are full of.
        if rng.random() < 0.7:
            return ("INFO  [healthcheck] GET %s 200 2B %.1fms ip=10.0.%d.%d "
                    "ua=\"kube-probe/1.28\"\n" % (
                        rng.choice(("/healthz", "/readyz")),
                        rng.choice((0.2, 0.3, 0.3, 0.4, 1.1)),
                        rng.randrange(4), rng.randrange(2, 6)))
        return ("INFO  [metrics] GET /metrics 200 %dB %.1fms ip=10.0.9.%d "
                "ua=\"Prometheus/2.48.1\"\n" % (
                    rng.randrange(8400, 8480), rng.choice((1.8, 2.1, 2.4, 3.9)),
                    rng.randrange(2, 4)))
    if k < 38:
        res = rng.choice(RESOURCES)
        path = "/api/v%d/%s/%d%s" % (rng.randrange(1, 4), res,
                                     int(rng.expovariate(1 / 20000)),
                                     rng.choice(SUBRES))
        if rng.random() < 0.3:
            path += "?page=%d&limit=%d" % (rng.randrange(1, 40),
                                           rng.choice((10, 20, 50, 100)))
        msg = '%s %s %d %dB %.1fms ip=%s req=%s ua="%s"' % (
            rng.choice(METHODS), path, rng.choice(STATUSES),
            int(rng.expovariate(1 / 4000)), rng.expovariate(1 / 35),
            _ip(rng), _hex(rng, 8), rng.choice(AGENTS))
    elif k < 50:
        msg = "query ok table=%s rows=%d took=%.2fms conn=%d tx=%s" % (
            rng.choice(TABLES), int(rng.expovariate(1 / 300)),
            rng.expovariate(1 / 8), rng.randrange(64), _hex(rng, 8))
    elif k < 58:
        msg = "user %d %s from %s session=%s" % (
            rng.randrange(1, 500000),
            rng.choice(("logged in", "logged out", "refreshed token",
                        "failed login", "changed password", "enabled 2fa")),
            _ip(rng), _hex(rng, 12))
    elif k < 66:
        msg = "job %s %s queue=%s attempt=%d duration=%.3fs items=%d" % (
            _hex(rng, 10),
            rng.choice(("started", "finished", "finished", "failed", "retried")),
            rng.choice(("default", "mail", "reports", "thumbs", "billing")),
            rng.randrange(1, 6), rng.expovariate(1 / 2.5),
            rng.randrange(0, 5000))
    elif k < 72:
        msg = "cache %s key=%s:%d ttl=%ds size=%d" % (
            rng.choice(("miss", "hit", "hit", "hit", "evict", "set")),
            rng.choice(RESOURCES), rng.randrange(1, 1000000),
            rng.choice((30, 60, 300, 600, 3600, 86400)),
            int(rng.expovariate(1 / 2000)))
    elif k < 78:
        msg = "retrying call to %s attempt=%d/5 backoff=%dms: %s" % (
            rng.choice(HOSTS), rng.randrange(1, 6), rng.randrange(50, 5000),
            rng.choice(ERRORS))
    elif k < 83:
        msg = "gc pause=%.2fms heap=%dMB live=%dMB goroutines=%d" % (
            rng.expovariate(1 / 3), rng.randrange(200, 4000),
            rng.randrange(100, 2000), rng.randrange(50, 3000))
    elif k < 88:
        msg = "error in %s: %s (code=%d, trace=%s)" % (
            rng.choice(FUNCS), rng.choice(ERRORS), rng.randrange(1000, 9999),
            _hex(rng, 16))
    elif k < 91:
        return "%-5s [%s]   at %s (src/%s/%s.rs:%d:%d)\n" % (
            lvl, comp, rng.choice(FUNCS), rng.choice(COMPONENTS).split(".")[0],
            rng.choice(FUNCS), rng.randrange(10, 2000), rng.randrange(1, 80))
    else:
        n = rng.randrange(4, 16)
        msg = " ".join(rng.choice(WORDS) for _ in range(n))
        msg += " (id=%d)" % rng.randrange(1, 10 ** 7)
    return "%-5s [%s] %s\n" % (lvl, comp, msg)


class Pools:
    """Content pools shared by every corpus (built once, deterministic)."""

    def __init__(self, quick):
        t0 = time.time()
        rng = random.Random(0xF11E)
        nbodies = 60_000 if quick else 300_000
        self.bodies = [make_body(rng).encode() for _ in range(nbodies)]
        self.avg_body = sum(map(len, self.bodies)) / len(self.bodies)
        # One "day" of monotonic timestamps (mean step 200 ms ~ 400k lines).
        self.ts = []
        ms = rng.randrange(0, 3_600_000)
        nts = 100_000 if quick else 420_000
        while len(self.ts) < nts:
            ms += int(rng.expovariate(1 / 200))
            if ms >= 86_400_000:
                break
            s, milli = divmod(ms, 1000)
            h, s = divmod(s, 3600)
            m, s = divmod(s, 60)
            self.ts.append(b"2024-05-14T%02d:%02d:%02d.%03dZ " % (h, m, s, milli))
        self.ts_len = len(self.ts[0])
        # Byte blobs for the binary-ish corpora.
        blob = 8 * MiB if quick else 32 * MiB
        brng = random.Random(0xB10B)
        self.rand = brng.randbytes(blob)
        # Low-entropy binary: 16 byte values, skewed -> gzip ~2x.
        alphabet = bytes([0, 0, 0, 0, 1, 1, 2, 3, 4, 8, 16, 32, 64, 127, 128, 255])
        table = bytes(alphabet[i % 16] for i in range(256))
        self.semi = brng.randbytes(blob).translate(table)
        self.text = self.log_text(random.Random(0x7E87), blob, day=0)
        self.build_seconds = time.time() - t0

    def log_text(self, rng, size, day=None):
        """Return >= size bytes of log lines (cut at a line end <= size when possible)."""
        out = []
        total = 0
        line_len = self.avg_body + self.ts_len
        while total < size:
            need = size - total
            n = min(len(self.ts), int(need / line_len * 1.05) + 8)
            start = rng.randrange(0, len(self.ts) - n + 1)
            d = rng.randrange(0, 28) if day is None else day
            bodies = rng.choices(self.bodies, k=n)
            chunk = b"".join(itertools.chain.from_iterable(
                zip(self.ts[start:start + n], bodies)))
            if d:
                chunk = chunk.replace(b"2024-05-14T", b"2024-05-%02dT" % (14 + d))
            if day is not None:
                day += 1
            out.append(chunk)
            total += len(chunk)
        data = b"".join(out)
        cut = data.rfind(b"\n", 0, size)
        return data[:cut + 1] if cut > 0 else data[:size]

    def slice(self, rng, blob, size):
        if size >= len(blob):
            reps = size // len(blob) + 1
            return (blob * reps)[:size]
        off = rng.randrange(0, len(blob) - size)
        return blob[off:off + size]


# --------------------------------------------------------------------------
# Writing helpers
# --------------------------------------------------------------------------
class Writer:
    def __init__(self, root):
        self.root = root
        self.count = 0
        self.bytes = 0
        self.h = hashlib.sha256()
        self._dirs = set()

    def write(self, rel, data):
        path = os.path.join(self.root, rel)
        d = os.path.dirname(path)
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)
        self.h.update(b"%s\0%d\0" % (rel.encode(), len(data)))
        self.h.update(data)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(data)
            while mv:
                n = os.write(fd, mv)
                mv = mv[n:]
        finally:
            os.close(fd)
        self.count += 1
        self.bytes += len(data)

    def write_chunks(self, rel, chunks):
        """Stream a large file from an iterable of bytes chunks."""
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.h.update(b"%s\0" % rel.encode())
        n = 0
        with open(path, "wb", buffering=0) as f:
            for c in chunks:
                self.h.update(c)
                f.write(c)
                n += len(c)
        self.h.update(b"\0%d\0" % n)
        self.count += 1
        self.bytes += n


def lognorm_size(rng, mean, sigma, lo, hi):
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, int(rng.lognormvariate(mu, sigma))))


# --------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------
def gen_small(w, p, pools):
    rng = random.Random(p["seed"])
    n = p["files"]
    for i in range(n):
        size = lognorm_size(rng, p["mean"], p["sigma"], p["min"], p["max"])
        kind = rng.random()
        if kind < 0.40:
            data, ext = pools.slice(rng, pools.text, size), "log"
        elif kind < 0.65:
            data, ext = pools.slice(rng, pools.semi, size), "dat"
        elif kind < 0.85:
            data, ext = pools.slice(rng, pools.rand, size), "bin"
        else:
            half = size // 2
            data = (pools.slice(rng, pools.text, half)
                    + pools.slice(rng, pools.rand, size - half))
            ext = "mix"
        # 25 top dirs x 20 subdirs; every 4th subdir also has a deeper level.
        d = i * 500 // n  # 500 leaf groups, ~100 files each
        top, sub = divmod(d, 20)
        rel = "d%02d/s%02d" % (top, sub)
        if sub % 4 == 0 and i % 2:
            rel += "/deep/er"
        w.write("%s/f%05d.%s" % (rel, i, ext), data)


def gen_large(w, p, pools):
    rng = random.Random(p["seed"])
    chunk = MiB
    for i in range(p["files"]):
        def chunks():
            left = p["size"]
            while left:
                c = min(chunk, left)
                r = rng.random()
                blob = pools.text if r < 0.4 else pools.semi if r < 0.8 else pools.rand
                yield pools.slice(rng, blob, c)
                left -= c
        w.write_chunks("large-%d.bin" % i, chunks())


def gen_text(w, p, pools):
    rng = random.Random(p["seed"])
    n = p["files"]
    for i in range(n):
        size = lognorm_size(rng, p["mean"], p["sigma"], p["min"], p["max"])
        svc = COMPONENTS[i % len(COMPONENTS)].replace(".", "-")
        rel = "%s/%s/%s-%04d.log" % ("node-%d" % (i % 8), svc, svc, i)
        w.write(rel, pools.log_text(rng, size))


C_TYPES = ["int", "unsigned int", "size_t", "ssize_t", "uint32_t", "uint64_t", "int64_t",
           "char *", "const char *", "void *", "struct buf *", "struct node *", "bool",
           "double", "off_t", "pid_t", "struct list_head *", "u8", "u16", "__le32"]
C_STEMS = ["buf", "node", "list", "hash", "map", "queue", "sock", "conn", "page", "inode",
           "dentry", "req", "resp", "ctx", "dev", "irq", "timer", "task", "lock", "cache",
           "entry", "table", "chunk", "block", "frame", "packet", "stream", "state", "key",
           "value", "index", "count", "len", "size", "offset", "flags", "mode", "head", "tail"]
C_VERBS = ["init", "alloc", "free", "get", "put", "find", "insert", "remove", "lookup",
           "update", "flush", "read", "write", "open", "close", "parse", "emit", "reset",
           "validate", "copy", "move", "grow", "shrink", "lock", "unlock", "wait", "notify"]
C_WORDS = ("the a of to and in is for on that with this it be by are as at from or an "
           "which when if not must may will can each every one no caller returns holds "
           "lock reference count buffer entry list before after until while zero error "
           "pointer memory freed allocated called context interrupt user kernel page").split()


def c_ident(rng):
    return "%s_%s" % (rng.choice(C_STEMS), rng.choice(C_VERBS))


def c_comment(rng, indent=""):
    lines = []
    for _ in range(rng.randrange(1, 5)):
        n = rng.randrange(5, 13)
        lines.append(indent + " * " + " ".join(rng.choice(C_WORDS) for _ in range(n)))
    return indent + "/*\n" + "\n".join(lines) + "\n" + indent + " */\n"


def c_statement(rng, depth):
    ind = "\t" * depth
    r = rng.random()
    a, b = rng.choice(C_STEMS), rng.choice(C_STEMS)
    if r < 0.25:
        return "%s%s = %s(%s, %s);\n" % (ind, a, c_ident(rng), b, rng.choice(C_STEMS))
    if r < 0.45 and depth < 3:
        body = "".join(c_statement(rng, depth + 1) for _ in range(rng.randrange(1, 4)))
        return "%sif (%s->%s %s %s) {\n%s%s}\n" % (
            ind, a, b, rng.choice(["==", "!=", "<", ">=", "&"]),
            rng.choice(["0", "NULL", "-EINVAL", "MAX_" + b.upper(), str(rng.randrange(256))]),
            body, ind)
    if r < 0.55 and depth < 3:
        body = "".join(c_statement(rng, depth + 1) for _ in range(rng.randrange(1, 4)))
        return "%sfor (i = 0; i < %s->%s; i++) {\n%s%s}\n" % (ind, a, b, body, ind)
    if r < 0.65:
        return "%sreturn %s;\n" % (ind, rng.choice(["0", "-ENOMEM", "-EINVAL", a, "ret"]))
    if r < 0.75:
        return "%s%s(%s->%s);\n" % (ind, c_ident(rng), a, b)
    if r < 0.82:
        return "%s%s %s = %s;\n" % (ind, rng.choice(C_TYPES), a, rng.randrange(1 << 16))
    return "%s%s->%s %s= %s;\n" % (ind, a, b, rng.choice(["", "+", "|", "&", "-"]),
                                    rng.choice(C_STEMS))


def c_item(rng):
    """One top-level item of a C file: a function, a struct, macros or prototypes."""
    r = rng.random()
    if r < 0.5:
        args = ", ".join("%s %s" % (rng.choice(C_TYPES), rng.choice(C_STEMS))
                         for _ in range(rng.randrange(1, 4)))
        body = "".join(c_statement(rng, 1) for _ in range(rng.randrange(3, 14)))
        return "%sstatic %s %s(%s)\n{\n%s}\n\n" % (
            c_comment(rng), rng.choice(C_TYPES), c_ident(rng), args, body)
    if r < 0.7:
        fields = "".join("\t%s %s;%s\n" % (rng.choice(C_TYPES), rng.choice(C_STEMS),
                                           rng.random() < 0.3 and " /* %s */" % " ".join(
                                               rng.choice(C_WORDS) for _ in range(4)) or "")
                         for _ in range(rng.randrange(2, 12)))
        return "struct %s {\n%s};\n\n" % (c_ident(rng), fields)
    if r < 0.85:
        return "".join("#define %s_%s\t0x%x\n" % (rng.choice(C_STEMS).upper(),
                                                  rng.choice(C_VERBS).upper(),
                                                  rng.randrange(1 << 20))
                       for _ in range(rng.randrange(2, 10))) + "\n"
    return "".join("extern %s %s(%s);\n" % (rng.choice(C_TYPES), c_ident(rng),
                                             rng.choice(C_TYPES))
                   for _ in range(rng.randrange(2, 8))) + "\n"


def gen_src(w, p, pools):
    rng = random.Random(p["seed"])
    lo, hi = p["min"], p["max"]
    # A pool of items to compose files from (as real trees repeat idioms), and fresh ones.
    items = [c_item(rng).encode() for _ in range(20_000)]
    for i in range(p["files"]):
        # Log-uniform between lo and hi: many small headers, some large sources.
        size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        parts = [b"/* SPDX-License-Identifier: GPL-2.0 */\n#include <linux/types.h>\n\n"]
        total = len(parts[0])
        while total < size:
            item = rng.choice(items) if rng.random() < 0.7 else c_item(rng).encode()
            parts.append(item)
            total += len(item)
        data = b"".join(parts)[:size]
        d = i % 100
        w.write("mod-%d/sub-%d/%s_%04d.%s" % (d // 10, d % 10, rng.choice(C_STEMS), i,
                                              "h" if i % 3 else "c"), data)


def gen_one(w, p, pools):
    rng = random.Random(p["seed"])
    size = p["size"]
    target = 16 * MiB

    def chunks():
        left = size
        day = 0
        while left:
            c = pools.log_text(rng, min(target, left), day=day % 28)
            day += 1
            if not c:
                break
            yield c
            left -= len(c)
    w.write_chunks("big.log", chunks())


def elf_files():
    """Regular ELF files under BIN_DIRS, each once, in a fixed (sorted) order."""
    seen = set()
    for top in BIN_DIRS:
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    with open(path, "rb") as f:
                        if f.read(4) != b"\x7fELF":
                            continue
                except OSError:
                    continue
                yield path


def gen_onebin(w, p, pools):
    size = p["size"]

    def chunks():
        left = size
        for path in elf_files():
            try:
                with open(path, "rb") as f:
                    data = f.read(left)
            except OSError:
                continue
            yield data
            left -= len(data)
            if not left:
                return
        sys.exit("onebin: only %d of %d bytes of ELF files under %s"
                 % (size - left, size, ", ".join(BIN_DIRS)))
    w.write_chunks("big.bin", chunks())


def gen_huge(w, p, pools):
    rng = random.Random(p["seed"])
    n = p["files"]
    text = pools.text
    tl = len(text)
    mx = p["max"]
    for i in range(n):
        size = rng.randrange(0, mx + 1)
        off = rng.randrange(0, tl - size)
        d = i * 400 // n
        w.write("h%02d/g%02d/t%06d.txt" % (d // 20, d % 20, i), text[off:off + size])


GENERATORS = {"small": gen_small, "large": gen_large, "text": gen_text, "src": gen_src,
              "one": gen_one, "onebin": gen_onebin, "huge": gen_huge}


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return "%.1f %s" % (n, unit) if unit != "B" else "%d B" % n
        n /= 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="output directory (corpora go in DIR/<name>)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny corpora for smoke tests")
    ap.add_argument("--only", default=",".join(ORDER),
                    help="comma-separated subset of: " + ",".join(ORDER))
    ap.add_argument("--force", action="store_true",
                    help="regenerate even if the stamp matches")
    args = ap.parse_args()

    preset_name = "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    for c in wanted:
        if c not in preset:
            ap.error("unknown corpus %r" % c)
    root = os.path.abspath(args.dir)
    stamps = os.path.join(root, ".stamps")
    os.makedirs(stamps, exist_ok=True)

    pools = None
    t_all = time.time()
    for name in ORDER:
        if name not in wanted:
            continue
        params = dict(preset[name], gen_version=GEN_VERSION, preset=preset_name)
        stamp = os.path.join(stamps, name + ".json")
        target = os.path.join(root, name)
        if not args.force and os.path.exists(stamp) and os.path.isdir(target):
            try:
                with open(stamp) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                st = {}
            if st.get("params") == params:
                print("%-6s up to date: %d files, %s, fingerprint %s (stamp %s)"
                      % (name, st["files"], human(st["bytes"]),
                         st["fingerprint"][:16], stamp))
                continue
        if os.path.exists(stamp):
            os.remove(stamp)
        if os.path.exists(target):
            shutil.rmtree(target)
        if pools is None and name != "onebin":
            pools = Pools(args.quick)
            print("pools  built in %.1fs (%d line bodies, avg line %.0f B)"
                  % (pools.build_seconds, len(pools.bodies),
                     pools.avg_body + pools.ts_len))
        t0 = time.time()
        w = Writer(target)
        GENERATORS[name](w, preset[name], pools)
        dt = time.time() - t0
        st = {"params": params, "files": w.count, "bytes": w.bytes,
              "fingerprint": w.h.hexdigest(), "seconds": round(dt, 2)}
        with open(stamp + ".tmp", "w") as f:
            json.dump(st, f, indent=1)
        os.replace(stamp + ".tmp", stamp)
        print("%-6s generated: %d files, %s in %.1fs, fingerprint %s -> %s"
              % (name, w.count, human(w.bytes), dt, st["fingerprint"][:16], target))
    print("done in %.1fs" % (time.time() - t_all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
