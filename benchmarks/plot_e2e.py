"""Plot bench_e2e.py's JSON: images per CPU-second of a training step against the mask ratio, one line per case.

    python benchmarks/plot_e2e.py e2e.json --png e2e.png
"""
import argparse
import json

CASES = {"fast": "flipkern fast path", "native": "native-best PyTorch", "reference": "reference model",
         "open_clip": "open_clip stock", "open_clip+fk": "open_clip + apply_to_open_clip"}


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = data.get("config", {})
    B = cfg.get("batch", 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in zip(CASES, ("o-", "s--", "^:", "d-.", "v-")):
        rows = sorted((s for s in data["summary"] if s["case"] == name), key=lambda s: s["mask"])
        if rows:
            ips = [B / s["cpu_s_min"] for s in rows]  # process CPU time: steady on a shared machine
            ax.plot([s["mask"] for s in rows], ips, style, label=CASES[name])
            for s, y in zip(rows, ips):
                ax.annotate(f"{y:.1f}", (s["mask"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mask ratio (fraction of image patches dropped)")
    ax.set_ylabel("images per CPU-second (fwd+bwd+AdamW; fastest step)")
    threads = {s.get("threads") for s in data["summary"]}
    ax.set_title(f"{cfg.get('model', '')} CLIP, B={B}, {cfg.get('captions', '')} captions, {cfg.get('device', '')} "
                 f"{cfg.get('dtype', '')}, {'/'.join(map(str, sorted(threads)))} thread(s)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json")
    p.add_argument("--png", default="e2e.png")
    a = p.parse_args(argv)
    with open(a.json) as f:
        plot(json.load(f), a.png)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
