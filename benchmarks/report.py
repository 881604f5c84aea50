"""Markdown tables from the benchmarks' JSON, and the README's "Measured results" tables from
the committed JSON under benchmarks/results/.

    python benchmarks/report.py bench.json [--png bench.png] [--baseline torch-native]   # pytest-benchmark JSON
    python benchmarks/report.py --e2e benchmarks/results/e2e_cpu.json                   # bench_e2e.py JSON
    python benchmarks/report.py --readme README.md     # rewrite the README's generated tables

Op tables (pytest-benchmark JSON): for each group (one case), every impl's median
and min time, throughput when the benchmark recorded bytes (GB/s) or flops
(TFLOP/s), peak memory when recorded, and flipkern's speedup over each other impl
(time_other / time_flipkern, medians).
"""
import argparse
import json
import os
import sys
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BEGIN, END = "<!-- report.py: begin -->", "<!-- report.py: end -->"
# issue 12's aims for the end-to-end run (2-core CPU, ViT-Ti/16, batch 32, fp32, realistic captions)
AIMS = {("open_clip+fk / open_clip", 0.75): 1.5, ("fast / native", 0.75): 1.3}
FLOP_TOLERANCE = 0.10  # "each time ratio within 10% of its FLOP ratio"


def fmt_time(s):
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


# ----------------------------------------------------------------------------- pytest-benchmark JSON

def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b.get("extra_info", {}).get("impl", b["name"])
        groups[b.get("group") or b["name"]][impl] = {"median": b["stats"]["median"], "min": b["stats"]["min"],
                                                      "rounds": b["stats"]["rounds"], **b.get("extra_info", {})}
    return data.get("machine_info", {}), groups


def table(groups, baseline=None):
    lines = ["| case | impl | median | min | throughput | peak mem | speedup |", "|---|---|---|---|---|---|---|"]
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
                speed = ", ".join(f"{impls[o]['median'] / r['median']:.2f}x vs {o}" for o in impls
                                  if o != impl and (baseline is None or o == baseline))
            else:
                speed = f"flipkern {r['median'] / fk['median']:.2f}x faster" if fk else ""
            lines.append(f"| {group} | {impl} | {fmt_time(r['median'])} | {fmt_time(r['min'])} | {thr} | {mem} | "
                         f"{speed} |")
    return "\n".join(lines)


def op_summary(groups):
    """One row per case: flipkern's median, then each other impl's median and flipkern's speedup over it."""
    lines = ["| case | flipkern | the others (their median, flipkern's speedup) |", "|---|---|---|"]
    for group, impls in groups.items():
        fk = impls.get("flipkern")
        if fk is None:
            continue
        others = sorted((o for o in impls if o != "flipkern"), key=lambda o: impls[o]["median"])
        def mem(r):
            return f", {r['peak_mem_bytes'] / 2**20:.0f} MiB" if r.get("peak_mem_bytes") else ""
        cells = ", ".join(f"`{o}` {fmt_time(impls[o]['median'])}{mem(impls[o])} "
                          f"({impls[o]['median'] / fk['median']:.2f}x)" for o in others)
        lines.append(f"| {group} | {fmt_time(fk['median'])}{mem(fk)} | {cells} |")
    return "\n".join(lines)


def run_line(machine):
    """One line about the run behind an op table (the conftest's machine_info additions)."""
    cpu = machine.get("cpu", {})
    load = machine.get("loadavg_start")
    return (f"{cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, torch {machine.get('torch', '?')}, "
            f"{machine.get('threads', '?')} threads, commit {str(machine.get('commit', '?'))[:10]}, "
            f"load average {'/'.join(f'{x:.1f}' for x in load) if load else '?'} at the start")


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


# ----------------------------------------------------------------------------- bench_e2e.py JSON

def e2e_run_line(data):
    r, c = data["run"], data["config"]
    load = "/".join(f"{x:.1f}" for x in (r.get("loadavg_start") or [])[:1] + (r.get("loadavg_end") or [])[:1])
    return (f"{r['machine']['cpu']}, {r['machine']['cores']} cores, {c['device']} {c['dtype']}, "
            f"{data['summary'][0].get('threads', '?')} threads, torch {r['torch']}, commit {str(r['commit'])[:10]}, "
            f"{data.get('repeats_done', data['repeats'])} of {data['repeats']} interleaved repeats done x {c['steps']} "
            f"timed steps per case, "
            f"1-min load average {load} (start/end); `{r['command']}`")


def e2e_cases_table(data):
    B = data["config"]["batch"]
    lines = ["| mask | case | timed steps | step min | step median | CPU time/step (min) | img per CPU-s | "
             "GFLOP/step | peak mem |", "|---|---|---|---|---|---|---|---|---|"]
    for s in data["summary"]:
        mem = f"{s['peak_mem_bytes'] / 2**20:.0f} MiB"
        gflop = f"{s['flops'] / 1e9:.1f}" if s.get("flops") else ""
        lines.append(f"| {s['mask']} | {s['case']} | {len(s['step_s'])} | {fmt_time(s['step_s_min'])} | "
                     f"{fmt_time(s['step_s_median'])} | "
                     f"{fmt_time(s['cpu_s_min'])} | {B / s['cpu_s_min']:.1f} | {gflop} | {mem} |")
    return "\n".join(lines)


def _verdict(ratio, ok):
    """met / not met, judged on the wall-clock and on the CPU-time ratio (min over steps)."""
    return ", ".join(f"{what} {'met' if ok(ratio[key]) else '**not met**'}"
                     for what, key in (("wall", "time_min"), ("CPU", "cpu_min")))


def e2e_ratio_table(data):
    lines = ["| ratio (> 1: the first is faster) | mask | wall (min) | wall (median) | CPU time (min) | "
             "FLOP ratio | wall / FLOP ratio | CPU / FLOP ratio | aim |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["ratios"]:
        fl = r.get("flops")
        flop_cells = f"{fl:.2f}x | {r['time_min'] / fl:.2f} | {r['cpu_min'] / fl:.2f}" if fl else " | | "
        aims = []
        goal = AIMS.get((r["name"], r["mask"]))
        if goal:
            aims.append(f">= {goal}x: {_verdict(r, lambda v: v >= goal)}")
        if fl and not r["name"].startswith("FLIP"):
            aims.append(f"within 10% of FLOPs: {_verdict(r, lambda v: v >= (1 - FLOP_TOLERANCE) * fl)}")
        lines.append(f"| {r['name']} | {r['mask']} | {r['time_min']:.2f}x | {r['time_median']:.2f}x | "
                     f"{r['cpu_min']:.2f}x | {flop_cells} | {'; '.join(aims)} |")
    return "\n".join(lines)


def e2e_where_time_goes(data, n=6):
    """Each case's top ops of one step by self CPU time (bench_e2e.py --profile), one line per case."""
    lines = []
    for s in data["summary"]:
        if s.get("top_ops"):
            total = sum(t for _, t, _ in s["top_ops"])
            ops = ", ".join(f"{name.replace('aten::', '')} {t / total:.0%}" for name, t, _ in s["top_ops"][:n])
            lines.append(f"- {s['case']} @ {s['mask']}: {ops}")
    if not lines:
        return ""
    return "Top ops by self CPU time (share of the top 12), one profiled step:\n\n" + "\n".join(lines)


def e2e_tables(data, profile=False):
    parts = [e2e_run_line(data), e2e_cases_table(data), e2e_ratio_table(data)]
    return "\n\n".join(parts + ([e2e_where_time_goes(data)] if profile else []))


def e2e_not_won(data):
    """The end-to-end ratios where flipkern is not faster (< 1.05x), read by CPU time in a one-thread
    run (its wall clock on a shared machine measures the load), else by the wall clock."""
    key, what = ("cpu_min", "CPU time") if data["config"].get("threads") == 1 else ("time_min", "wall clock")
    return [f"end to end, {data['config']['captions']} captions: {r['name']} at mask {r['mask']}: "
            f"{r[key]:.2f}x ({what})" for r in data["ratios"] if not r["name"].startswith("FLIP") and r[key] < 1.05]


def ops_not_won(groups):
    """The op cases where some other impl's median is within 5% of flipkern's or faster."""
    out = []
    for group, impls in groups.items():
        fk = impls.get("flipkern")
        if fk is None:
            continue
        beaten = [f"`{o}` {impls[o]['median'] / fk['median']:.2f}x" for o in impls
                  if o != "flipkern" and impls[o]["median"] < 1.05 * fk["median"]]
        if beaten:
            out.append(f"{group}: flipkern vs {', '.join(beaten)}")
    return out


# ----------------------------------------------------------------------------- README

def _readme_order(name):
    return (not name.startswith("e2e"), name)  # the end-to-end runs first


def readme_section(results=RESULTS):
    """The generated part of the README's "Measured results": every committed JSON with its run line,
    then the list of cases where flipkern does not win."""
    parts, not_won = [], []
    for name in sorted((n for n in os.listdir(results) if n.endswith(".json")), key=_readme_order):
        path = os.path.join(results, name)
        with open(path) as f:
            data = json.load(f)
        if "summary" in data:
            parts.append(f"#### `benchmarks/results/{name}`\n\n{e2e_tables(data, profile=True)}")
            not_won += e2e_not_won(data)
        else:
            machine, groups = load(path)
            parts.append(f"#### `benchmarks/results/{name}`\n\n{run_line(machine)}; "
                         f"`{machine.get('command', '?')}`\n\n{op_summary(groups)}")
            not_won += ops_not_won(groups)
    if not_won:
        parts.append("#### Where flipkern does not win (generated: ratio < 1.05x)\n\n"
                     + "\n".join(f"- {line}" for line in not_won))
    return "\n\n".join(parts)


def update_readme(path, results=RESULTS):
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{readme_section(results)}\n{END}{tail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", help="a pytest-benchmark JSON")
    p.add_argument("--png")
    p.add_argument("--baseline", help="only show the flipkern speedup over this impl")
    p.add_argument("--e2e", help="a bench_e2e.py JSON")
    p.add_argument("--readme", help="rewrite this README's generated block from benchmarks/results/")
    a = p.parse_args(argv)
    if a.readme:
        update_readme(a.readme)
        print(f"rewrote the generated tables of {a.readme}")
    if a.e2e:
        with open(a.e2e) as f:
            print(e2e_tables(json.load(f)))
    if a.json:
        machine, groups = load(a.json)
        if machine:
            print(run_line(machine) + "\n")
        print(table(groups, a.baseline))
        if a.png:
            plot(groups, a.png)
            print(f"\nplot: {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
