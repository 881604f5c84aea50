"""Plot bench_e2e.py's JSON: training throughput (img/s) against the mask ratio, one line per path.

    python benchmarks/plot_e2e.py e2e.json --png e2e.png
"""
import argparse
import json


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = data["results"]
    cfg = data.get("config", {})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("fast", "o-"), ("native", "s--"), ("reference", "^:")):
        rows = sorted((r for r in results if r["path"] == name), key=lambda r: r["mask"])
        if rows:
            ax.plot([r["mask"] for r in rows], [r["img_per_s"] for r in rows], style,
                    label={"fast": "flipkern fast path", "native": "PyTorch-native (SDPA, padded text)",
                           "reference": "reference model"}[name])
            for r in rows:
                ax.annotate(f"{r['img_per_s']:.1f}", (r["mask"], r["img_per_s"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mask ratio (fraction of image patches dropped)")
    ax.set_ylabel("training throughput (img/s, fwd+bwd+AdamW)")
    threads = {r.get("threads") for r in results}
    ax.set_title(f"{cfg.get('model', '')} CLIP, B={cfg.get('batch', '')}, {cfg.get('device', '')} "
                 f"{cfg.get('precision', '')}, {'/'.join(map(str, sorted(threads)))} thread(s)")
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
