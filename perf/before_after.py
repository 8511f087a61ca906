#!/usr/bin/env python3
"""Before/after saturation of the distributed kvgate (issue #11, acceptance 4), in one run.

Runs the `kvgate` row of perf/anchors/side_by_side.py (`kvgate frontend` + 4 x `kvgate worker`
with etcd and NATS; the saturation workload: closed loop, shared-prefix --chat, 16 groups,
1,024-word prefix, 64 words of suffix, 64 output tokens) once per (build, concurrency, round),
alternating the builds in mirrored order (A B B A; with three builds A B C C B A) --rounds times
at every concurrency level, every system started afresh. The same load generator (--bench)
measures every build. It then prints req/s and frontend CPU ms per request (the `kvgate
frontend` process, /proc utime+stime) for each run, the medians per build and each build's
ratio to the first: the ratio of the medians, and per round the ratio of the round's means.

  perf/before_after.py --build before=/work/scratch/bins/before/kvgate \\
      --build after=/work/scratch/bins/after/kvgate --bench /work/scratch/bins/after/kvgate-bench \\
      --concurrency 64,128 --rounds 2 --sat-requests 12000 --nice -10

Anything after `--` goes to side_by_side.py unchanged. Output: --out-dir/<label>-c<C>-r<round>-<i>/
(side_by_side's own files) and --out-dir/before_after.json. `--report-from JSON` prints again.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBS = os.path.join(ROOT, "perf/anchors/side_by_side.py")


def pick(r):
    x = r["side_by_side"]
    return {
        "req_per_s": r["request_throughput_per_s"],
        "frontend_cpu_ms_per_req": (r["cpu"].get("frontend_cpu_us_per_request") or 0) / 1000,
        "system_cpu_ms_per_req": x["system_cpu_ms_per_request"],
        "ttft_p50_ms": r["ttft_ms"]["p50"],
        "ttft_p99_ms": r["ttft_ms"]["p99"],
        "e2e_p50_ms": r["e2e_ms"]["p50"],
        "hit_rate": r["kv_hit_rate"],
        "errors": sum(r["errors"].values()),
        "ok": r["ok"],
        "other_cpu_cores": x["other_cpu_cores"],
        "cpu_s_by_process": x["cpu_s_by_process"],
        "loadavg_1m_end": x["loadavg_1m_end"],
    }


KEYS = [("req/s", "req_per_s", "{:.0f}"), ("frontend CPU ms/req", "frontend_cpu_ms_per_req", "{:.3f}"),
        ("system CPU ms/req", "system_cpu_ms_per_req", "{:.3f}"), ("TTFT p50", "ttft_p50_ms", "{:.1f}"),
        ("TTFT p99", "ttft_p99_ms", "{:.0f}"), ("E2E p50", "e2e_p50_ms", "{:.1f}"),
        ("other cores", "other_cpu_cores", "{:.2f}"), ("errors", "errors", "{}")]


def report(runs, labels):
    med = statistics.median
    out = ["| c | round | order | build | " + " | ".join(k for k, _, _ in KEYS) + " |",
           "| ---: | ---: | ---: | --- |" + " ---: |" * len(KEYS)]
    for r in runs:
        out.append(f"| {r['concurrency']} | {r['round']} | {r['order']} | {r['label']} | "
                   + " | ".join(f.format(r['m'][k]) for _, k, f in KEYS) + " |")
    base = labels[0]
    out += ["", "| c | metric | " + " | ".join(f"{l} (median)" for l in labels) + " | "
            + " | ".join(f"{l} / {base}" for l in labels[1:]) + " | per-round ratios |",
            "| ---: | --- |" + " ---: |" * (2 * len(labels) - 1) + " --- |"]
    for c in sorted({r["concurrency"] for r in runs}):
        rounds = sorted({r["round"] for r in runs if r["concurrency"] == c})
        for name, key, f in KEYS[:6]:
            vals = {l: [r["m"][key] for r in runs if r["concurrency"] == c and r["label"] == l] for l in labels}
            if not all(vals.values()):
                continue
            meds = {l: med(v) for l, v in vals.items()}
            per_round = []
            for l in labels[1:]:
                xs = []
                for rd in rounds:
                    m = {k: [r["m"][key] for r in runs if r["concurrency"] == c and r["round"] == rd and r["label"] == k]
                         for k in (base, l)}
                    if m[base] and m[l] and statistics.fmean(m[base]):
                        xs.append(statistics.fmean(m[l]) / statistics.fmean(m[base]))
                per_round.append(f"{l}: " + ", ".join(f"{x:.3f}" for x in xs))
            out.append(f"| {c} | {name} | " + " | ".join(f.format(meds[l]) for l in labels) + " | "
                       + " | ".join(f"{meds[l] / meds[base]:.3f}×" if meds[base] else "n/a" for l in labels[1:])
                       + " | " + "; ".join(per_round) + " |")
    return "\n".join(out)


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="append", default=[], metavar="LABEL=KVGATE",
                   help="a build to measure (repeat; the first is the baseline of the ratios)")
    p.add_argument("--bench", default=os.path.join(ROOT, "target/release/kvgate-bench"), help="one load generator for both")
    p.add_argument("--concurrency", default="64,128")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sat-requests", type=int, default=12000)
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target/perf-before-after"))
    p.add_argument("--report-from", metavar="JSON")
    a = p.parse_args(argv)
    if a.report_from:
        with open(a.report_from) as f:
            d = json.load(f)
        print(report(d["runs"], d["labels"]))
        return
    if len(a.build) < 2:
        p.error("give at least two --build LABEL=PATH")
    os.makedirs(a.out_dir, exist_ok=True)
    bins = {}
    for b in a.build:
        label, path = b.split("=", 1)
        bins[label] = os.path.abspath(path)
    labels = list(bins)
    order = labels + labels[::-1]
    runs = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        for rd in range(1, a.rounds + 1):
            for i, label in enumerate(order):
                d = os.path.join(a.out_dir, f"{label}-c{c}-r{rd}-{i}")
                cmd = [sys.executable, SBS, "--systems", "kvgate", "--runs", "saturation", "--kvgate", bins[label],
                       "--bench", os.path.abspath(a.bench), "--concurrency", str(c), "--sat-requests", str(a.sat_requests),
                       "--nice", str(a.nice), "--out-dir", d] + extra
                print(f"\n### c={c} round {rd} #{i} {label}: {' '.join(cmd)}", flush=True)
                subprocess.run(cmd, check=True, stdout=open(os.path.join(a.out_dir, f"{label}-c{c}-r{rd}-{i}.log"), "w"),
                               stderr=subprocess.STDOUT)
                with open(os.path.join(d, "side_by_side.json")) as f:
                    res = json.load(f)
                r = res.get("saturation", {}).get("kvgate")
                if r is None:
                    sys.exit(f"run failed; see {d}")
                m = pick(r)
                runs.append({"concurrency": c, "round": rd, "order": i, "label": label, "binary": bins[label],
                             "dir": d, "m": m})
                print(f"    {m['req_per_s']:.0f} req/s, frontend {m['frontend_cpu_ms_per_req']:.3f} ms/req, system "
                      f"{m['system_cpu_ms_per_req']:.3f} ms/req, TTFT p50 {m['ttft_p50_ms']:.1f} p99 {m['ttft_p99_ms']:.0f}, "
                      f"errors {m['errors']}, other {m['other_cpu_cores']:.2f} cores", flush=True)
                with open(os.path.join(a.out_dir, "before_after.json"), "w") as f:
                    json.dump({"argv": sys.argv, "binaries": bins, "labels": labels, "bench": a.bench, "runs": runs}, f,
                              indent=1)
    print()
    print(report(runs, labels))


if __name__ == "__main__":
    main()
