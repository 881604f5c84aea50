"""Turn pytest-benchmark JSON into a markdown table of ratios (and a PNG).

    python benchmarks/report.py bench.json [--png bench.png] [--baseline torch-native]

For each group (one case), every impl's median time, throughput when the
benchmark recorded bytes (GB/s) or flops (TFLOP/s), peak memory when recorded,
and its speedup over each other impl of the group (time_other / time_impl).
"""
import argparse
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b.get("extra_info", {}).get("impl", b["name"])
        groups[b.get("group") or b["name"]][impl] = {"median": b["stats"]["median"], **b.get("extra_info", {})}
    return data.get("machine_info", {}), groups


def fmt_time(s):
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def table(groups, baseline=None):
    lines = ["| case | impl | median | throughput | peak mem | speedup |", "|---|---|---|---|---|---|"]
    for group, impls in groups.items():
        fk = impls.get("flipkern")
        for impl, r in sorted(impls.items(), key=lambda kv: kv[1]["median"]):
            thr = ""
            if r.get("bytes"):
                thr = f"{r['bytes'] / r['median'] / 1e9:.1f} GB/s"
            elif r.get("flops"):
                thr = f"{r['flops'] / r['median'] / 1e12:.3f} TFLOP/s"
            mem = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB" if r.get("peak_mem_bytes") else ""
            if impl == "flipkern":
                others = [f"{impls[o]['median'] / r['median']:.2f}x vs {o}" for o in impls if o != impl
                          and (baseline is None or o == baseline)]
                speed = ", ".join(others)
            else:
                speed = f"flipkern {r['median'] / fk['median']:.2f}x faster" if fk else ""
            lines.append(f"| {group} | {impl} | {fmt_time(r['median'])} | {thr} | {mem} | {speed} |")
    return "\n".join(lines)


def plot(groups, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(groups)
    impls = sorted({i for g in groups.values() for i in g})
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    h = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        ys = [i + j * h for i in range(len(names))]
        ax.barh(ys, [groups[n].get(impl, {}).get("median", 0) * 1e3 for n in names], height=h, label=impl)
    ax.set_yticks([i + 0.4 - h / 2 for i in range(len(names))], names, fontsize=7)
    ax.set_xlabel("median time (ms), lower is better")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--png")
    p.add_argument("--baseline", help="only show the flipkern speedup over this impl")
    a = p.parse_args(argv)
    machine, groups = load(a.json)
    if machine:
        print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
              f"{machine.get('cpu', {}).get('count', '?')} cores\n")
    print(table(groups, a.baseline))
    if a.png:
        plot(groups, a.png)
        print(f"\nplot: {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
