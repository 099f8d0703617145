#!/usr/bin/python3
"""Turns one scripts/bench run (a directory of JSON files) into results.md,
results.json and bench.png: each Custos figure next to the baselines measured
in the same run, as ratios. Usage: bench_report.py OUT_DIR"""
import glob
import json
import os
import platform
import re
import subprocess
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def total(name):
    run = load(name)
    return None if run is None else run["total"]


concurrency = [1, 16, 64]
series = {
    "echo (a)": "echo",
    "hsm-echo (b)": "hsm-echo",
    "Custos GenerateDataKey": "custos-generate-data-key",
    "Custos Decrypt": "custos-decrypt",
}
figures = {label: {c: total(f"{prefix}-c{c}") for c in concurrency}
           for label, prefix in series.items()}

lines = []
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                     capture_output=True, text=True).stdout.strip()
lines.append(f"Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}; "
             "client and server on the same machine.\n")
lines.append("| series | in flight | calls/s | p50 ms | p99 ms | p99.9 ms | errors "
             "| calls/s ÷ (b) | calls/s ÷ (a) | p99 ÷ (b) p99 |")
lines.append("|---|---|---|---|---|---|---|---|---|---|")
ratios = {}
for label, by_c in figures.items():
    for c, t in by_c.items():
        if t is None:
            continue
        a = figures["echo (a)"][c]
        b = figures["hsm-echo (b)"][c]
        rb = t["calls_per_second"] / b["calls_per_second"] if b else float("nan")
        ra = t["calls_per_second"] / a["calls_per_second"] if a else float("nan")
        pb = t["latency_ms"]["p99"] / b["latency_ms"]["p99"] if b else float("nan")
        ratios[f"{label} @{c}"] = {"vs_b": rb, "vs_a": ra, "p99_vs_b": pb}
        errors = sum(t["errors"].values())
        lines.append(f"| {label} | {c} | {t['calls_per_second']:.0f} | "
                     f"{t['latency_ms']['p50']:.2f} | {t['latency_ms']['p99']:.2f} | "
                     f"{t['latency_ms']['p99.9']:.2f} | {errors} | "
                     f"{rb:.2f} | {ra:.2f} | {pb:.2f} |")

mix = load("custos-mix-c64")
if mix:
    lines.append("\nMixed load at 64 in flight (80% GenerateDataKey, 15% Decrypt, "
                 "5% Encrypt):\n")
    lines.append("| rpc | calls/s | p50 ms | p99 ms |")
    lines.append("|---|---|---|---|")
    for name, s in list(mix["per_rpc"].items()) + [("total", mix["total"])]:
        lines.append(f"| {name} | {s['calls_per_second']:.0f} | "
                     f"{s['latency_ms']['p50']:.2f} | {s['latency_ms']['p99']:.2f} |")

raw = {}
hsm_path = os.path.join(out, "hsm_bench.json")
if os.path.exists(hsm_path):
    with open(hsm_path) as f:
        for b in json.load(f)["benchmarks"]:
            raw[b["name"]] = b.get("items_per_second", 0)
raw_encrypt = max([v for k, v in raw.items() if k.startswith("BM_RawSessionEncrypt32")],
                  default=0)
lines.append("\nBatch data keys (GenerateDataKeys, 1,000 per call) against raw HSM "
             "AES-GCM encrypts on one session (hsm_bench, best of 1 and 2 threads: "
             f"{raw_encrypt:.0f}/s):\n")
lines.append("| calls in flight | data keys/s | ÷ raw HSM encrypt/s | p99 ms per call |")
lines.append("|---|---|---|---|")
batch = {}
for c in [1, 2, 4]:
    t = total(f"custos-generate-data-keys-c{c}")
    if t is None:
        continue
    r = t["items_per_second"] / raw_encrypt if raw_encrypt else float("nan")
    batch[c] = {"data_keys_per_second": t["items_per_second"], "vs_raw": r}
    lines.append(f"| {c} | {t['items_per_second']:.0f} | {r:.2f} | "
                 f"{t['latency_ms']['p99']:.1f} |")
lines.append("\nRaw HSM figures from hsm_bench in the same run:\n")
for name, ips in sorted(raw.items()):
    lines.append(f"- {name}: {ips:.0f}/s")

rss = {}
rss_path = os.path.join(out, "rss.txt")
if os.path.exists(rss_path):
    for line in open(rss_path):
        m = re.match(r"(VmRSS|VmHWM):\s+(\d+) kB", line)
        if m:
            rss[m.group(1)] = int(m.group(2)) / 1024
        m = re.match(r"requests (\d+)", line)
        if m:
            rss["requests"] = int(m.group(1))
    lines.append(f"\ncustosd after {rss.get('requests', 0):,} requests: RSS "
                 f"{rss.get('VmRSS', 0):.1f} MiB (peak {rss.get('VmHWM', 0):.1f} MiB).")
startup = []
startup_path = os.path.join(out, "startup.txt")
if os.path.exists(startup_path):
    startup = [int(l.split()[1]) for l in open(startup_path) if l.startswith("startup_ms")]
    if startup:
        lines.append(f"Start-up to accepting connections with the keys created above: "
                     f"{', '.join(str(s) for s in startup)} ms (three restarts).")

text = "\n".join(lines) + "\n"
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"figures": figures, "ratios": ratios, "batch": batch, "raw_hsm": raw,
               "rss_mib": rss, "startup_ms": startup}, f, indent=2)
print(text)

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("python3-matplotlib is not installed: no plot")
    sys.exit(0)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
for label, by_c in figures.items():
    xs = [c for c in concurrency if by_c[c]]
    if not xs:
        continue
    left.plot(xs, [by_c[c]["calls_per_second"] for c in xs], marker="o", label=label)
    right.plot(xs, [by_c[c]["latency_ms"]["p99"] for c in xs], marker="o", label=label)
for ax, title, unit in ((left, "Throughput", "calls/s"), (right, "p99 latency", "ms")):
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency)
    ax.set_xticklabels([str(c) for c in concurrency])
    ax.set_xlabel("calls in flight")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
left.legend(fontsize=8)
fig.suptitle("Custos vs baselines, same machine, same run")
fig.tight_layout()
fig.savefig(os.path.join(out, "bench.png"), dpi=110)
print(f"plot: {os.path.join(out, 'bench.png')}")
