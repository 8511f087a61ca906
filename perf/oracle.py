#!/usr/bin/env python3
"""The oracle gap (issue #16): how many prompt tokens a workload could find cached at best.

Reads the prompts of a workload, either as kvgate-bench sent them (`kvgate-bench --dump-blocks
FILE`, in send order: the exact workload of a run, sessions included) or straight from a
Mooncake-format trace (`--trace`, the order of its lines, as `kvgate-bench mooncake` replays it
without `--sessions`), and prints:

(a) **one infinite cache**: every request hits the longest prefix of its blocks any earlier
    request computed. No router can hit more, so this is an upper bound on the hit rate.
(b) **per worker count N**, each worker an LRU cache of `--capacity-blocks` blocks (the mocker's
    `--num-gpu-blocks`), two estimates, both heuristics rather than proven bounds:
    - *pooled*: one LRU cache of N x capacity blocks, as if the workers shared their blocks
      (no router can place a block twice for free, so this is the capacity-limited reference);
    - *greedy*: a greedy best-overlap assignment under a balance cap. Each request goes to the
      worker holding its longest cached prefix among those that would not exceed `--balance`
      (1.5, the issue's target) times the mean request count (when none qualifies: those with
      the fewest requests); ties: the fewest prompt tokens so far, then the lowest index. Without
      the cap a greedy router herds every request onto the worker holding a prefix that all
      share (the Mooncake trace starts every prompt with the same block). An assignment that
      looks ahead could do better.
    Both ignore time: a request's blocks are cached as soon as it is placed, and no eviction is
    blocked by running requests.

Counting matches kvgate-bench's `kv_hit_rate` (sum of `usage.prompt_tokens_details.cached_tokens`
over sum of `prompt_tokens`) with the mocker's cache: a prompt of T tokens is cut into KV blocks
of `--block-size` tokens (the server's `--page-size`, 16 by default); a block is identified by
every token up to its end (the router's and the mocker's chained sequence hash); a hit is a
prefix of cached blocks, at most (T - 1) // block_size of them (the mocker always computes one
token), and counts block_size tokens each. After a request its full prompt blocks are cached,
plus (in the LRU model) the blocks its output fills, which no other request shares; on release
the tail goes first, so the prefix stays cached longest (the mocker's eviction order).

kvgate-bench builds token prompts from segments: block id h becomes a fixed sequence of token
ids drawn from a generator seeded with h, cut to the segment's length; equal ids give equal
tokens. So a KV block is identified here by the (id, offset range) pieces it spans and the
block before it, with no need to render tokens.

Standard library only. Examples:

    perf/oracle.py --dump run.blocks.jsonl --workers 4 --capacity-blocks 32768
    perf/oracle.py --trace ../shared/data/mooncake/conversation_trace.jsonl --max-requests 2000 \\
        --workers 1,2,4,8 --capacity-blocks 131072 --json oracle.json
"""

import argparse
import json
import sys
from collections import OrderedDict

MAX_PROMPT_TOKENS = 4_000_000  # kvgate-bench's workload::MAX_PROMPT_TOKENS


def read_dump(path):
    """Yields (segments, max_tokens) per request, in send order."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            try:
                segs = [(int(i), int(ln)) for i, ln in r["segments"]]
                yield segs, int(r.get("max_tokens", 1))
            except (KeyError, TypeError, ValueError) as e:
                sys.exit(f"{path}:{n}: not a kvgate-bench --dump-blocks line ({e})")


def read_trace(path, trace_block, max_requests, max_input, max_output):
    """Yields (segments, max_tokens) as `kvgate-bench mooncake` builds them (workload.rs)."""
    count = 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if max_requests is not None and count >= max_requests:
                return
            if not line.strip():
                continue
            r = json.loads(line)
            left = min(int(r["input_length"]), MAX_PROMPT_TOKENS)
            if max_input is not None:
                left = min(left, max_input)
            ids = r["hash_ids"]
            if len(ids) < -(-left // trace_block):
                sys.exit(f"{path}:{n}: {len(ids)} hash ids cannot cover {left} tokens (wrong --trace-block-size?)")
            segs = []
            for h in ids:
                if left == 0:
                    break
                ln = min(left, trace_block)
                segs.append((int(h), ln))
                left -= ln
            out = max(1, int(r["output_length"]))
            if max_output is not None:
                out = min(out, max_output)
            count += 1
            yield segs, out


def block_keys(segs, block):
    """(prompt tokens, the key of each full KV block). A key stands for every token up to the
    block's end: the previous key and the (segment id, start, end) pieces the block spans."""
    keys = []
    prev = 0
    pieces = []
    filled = 0
    total = 0
    for sid, ln in segs:
        off = 0
        while off < ln:
            take = min(block - filled, ln - off)
            pieces.append((sid, off, off + take))
            off += take
            filled += take
            if filled == block:
                prev = hash((prev, tuple(pieces)))
                keys.append(prev)
                pieces = []
                filled = 0
        total += ln
    return total, keys


def prefix_hits(contains, keys, limit):
    n = 0
    while n < limit and contains(keys[n]):
        n += 1
    return n


class Lru:
    """One worker's cache: keys oldest first; `capacity` blocks."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.d = OrderedDict()
        self.unique = 0  # ids of output blocks, shared by nothing

    def add_request(self, keys, output_blocks):
        # Released tail first: output blocks, then the prompt's from its last to its first.
        for _ in range(output_blocks):
            self.unique += 1
            self.d[("out", self.unique)] = None
        for k in reversed(keys):
            if k in self.d:
                self.d.move_to_end(k)
            else:
                self.d[k] = None
        while len(self.d) > self.capacity:
            self.d.popitem(last=False)


def analyse(requests, block, workers, capacity, balance=1.5):
    infinite = set()
    lrus = {n: [Lru(capacity) for _ in range(n)] for n in workers}
    pooled = {n: Lru(capacity * n) for n in workers}
    assigned = {n: [0] * n for n in workers}
    per_worker_requests = {n: [0] * n for n in workers}
    cached_inf = 0
    cached = {n: 0 for n in workers}
    cached_pooled = {n: 0 for n in workers}
    prompt = 0
    count = 0
    for segs, max_tokens in requests:
        total, keys = block_keys(segs, block)
        if total == 0:
            continue
        count += 1
        prompt += total
        limit = min(len(keys), (total - 1) // block)
        cached_inf += block * prefix_hits(infinite.__contains__, keys, limit)
        infinite.update(keys)
        out_blocks = (total + max_tokens) // block - len(keys)
        for n in workers:
            p = pooled[n]
            cached_pooled[n] += block * prefix_hits(p.d.__contains__, keys, limit)
            p.add_request(keys, out_blocks)
            caches, counts = lrus[n], per_worker_requests[n]
            cap = balance * count / n
            allowed = [i for i in range(n) if counts[i] + 1 <= cap]
            if not allowed:
                fewest = min(counts)
                allowed = [i for i in range(n) if counts[i] == fewest]
            hits = {i: prefix_hits(caches[i].d.__contains__, keys, limit) for i in allowed}
            w = min(allowed, key=lambda i: (-hits[i], assigned[n][i], i))
            cached[n] += block * hits[w]
            assigned[n][w] += total
            per_worker_requests[n][w] += 1
            caches[w].add_request(keys, out_blocks)
    rate = lambda c: c / prompt if prompt else 0.0  # noqa: E731
    return {
        "requests": count,
        "prompt_tokens": prompt,
        "block_size": block,
        "capacity_blocks": capacity,
        "infinite_cache": {"cached_tokens": cached_inf, "hit_rate": rate(cached_inf)},
        "balance": balance,
        "pooled_lru": {str(n): {"cached_tokens": cached_pooled[n], "hit_rate": rate(cached_pooled[n])} for n in workers},
        "greedy_lru": {
            str(n): {
                "cached_tokens": cached[n],
                "hit_rate": rate(cached[n]),
                "requests_per_worker": per_worker_requests[n],
            }
            for n in workers
        },
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dump", help="a kvgate-bench --dump-blocks file (the exact prompts of a run)")
    src.add_argument("--trace", help="a Mooncake-format JSONL trace (replayed in line order)")
    ap.add_argument("--trace-block-size", type=int, default=512, help="tokens per hash id (kvgate-bench mooncake --block-size)")
    ap.add_argument("--max-requests", type=int, help="--trace: the first N requests")
    ap.add_argument("--max-input-tokens", type=int, help="--trace: cut prompts (kvgate-bench --max-input-tokens)")
    ap.add_argument("--max-output-tokens", type=int, help="--trace: cap outputs (kvgate-bench --max-output-tokens)")
    ap.add_argument("--block-size", type=int, default=16, help="the server's KV block size, --page-size (16)")
    ap.add_argument("--workers", default="4", help="comma-separated worker counts for the LRU estimate (4)")
    ap.add_argument("--capacity-blocks", type=int, default=16384, help="KV blocks per worker, --num-gpu-blocks (16384)")
    ap.add_argument("--balance", type=float, default=1.5, help="greedy: most requests per worker, times the mean (1.5)")
    ap.add_argument("--json", help="also write the result as JSON here ('-': stdout only, as JSON)")
    a = ap.parse_args(argv)
    if not a.balance >= 1.0:
        ap.error("--balance must be >= 1")
    if a.block_size < 1 or a.trace_block_size < 1 or a.capacity_blocks < 1:
        ap.error("--block-size, --trace-block-size and --capacity-blocks must be >= 1")
    try:
        workers = sorted({int(x) for x in a.workers.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--workers {a.workers!r}: expected comma-separated integers")
    if not workers or workers[0] < 1:
        ap.error("--workers needs counts >= 1")
    if a.dump:
        reqs = read_dump(a.dump)
    else:
        reqs = read_trace(a.trace, a.trace_block_size, a.max_requests, a.max_input_tokens, a.max_output_tokens)
    r = analyse(reqs, a.block_size, workers, a.capacity_blocks, a.balance)
    r["source"] = a.dump or a.trace
    if a.json == "-":
        json.dump(r, sys.stdout, indent=1)
        print()
        return 0
    print(f"{r['requests']} requests, {r['prompt_tokens']} prompt tokens, blocks of {a.block_size} tokens")
    inf = r["infinite_cache"]
    print(f"one infinite cache (upper bound): hit rate {inf['hit_rate']:.4f} ({inf['cached_tokens']} cached)")
    for n, g in r["greedy_lru"].items():
        p = r["pooled_lru"][n]
        print(f"{n} workers x {a.capacity_blocks} blocks, pooled LRU: hit rate {p['hit_rate']:.4f} ({p['cached_tokens']} cached)")
        print(
            f"{n} workers x {a.capacity_blocks} blocks, greedy LRU (balance {a.balance}): hit rate {g['hit_rate']:.4f} "
            f"({g['cached_tokens']} cached; requests per worker {' '.join(map(str, g['requests_per_worker']))})"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
