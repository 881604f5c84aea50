"""metrics.jsonl (one JSON object per line) and the loss/accuracy curve PNG."""
import json
import math
import os


class MetricsLog:
    """Appends records to ``<output_dir>/metrics.jsonl``. ``truncate_after(step)``
    drops records of steps a resumed run is about to redo."""

    def __init__(self, path, enabled=True):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step):
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def read_metrics(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    pass
    return out


def plot_curves(metrics_path, png_path):
    """Train loss (and lr) against step; zero-shot top-1 / retrieval R@1 against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    train = [r for r in recs if r.get("type") == "train" and math.isfinite(r.get("loss", float("nan")))]
    evals = [r for r in recs if r.get("type") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
        ax1.set_yscale("log")
        axl = ax1.twinx()
        axl.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", lw=0.8, alpha=0.6,
                 label="lr")
        axl.set_ylabel("learning rate", color="gray")
    ax1.set_xlabel("step")
    ax1.set_ylabel("contrastive loss")
    ax1.set_title("training loss")
    for key, label in (("zeroshot_top1", "zero-shot top-1"), ("zeroshot_top5", "zero-shot top-5"),
                       ("i2t_r@1", "image->text R@1"), ("t2i_r@1", "text->image R@1")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_title("held-out evaluation")
    if evals:
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
