"""Which open_clip configs apply_to_open_clip covers, and why not where it does not.

    python benchmarks/open_clip_coverage.py [--json out.json] [NAME ...]

Builds every open_clip config (or the NAMEs given) offline with pretrained=None,
its towers cut to one layer (text and open_clip ViT: layers=1, text vocabulary
1024; timm trunks:
depth=1 where the model takes it, built without initializing since only their
structure is inspected), runs flipkern.apply_to_open_clip on it and prints, per
config, what each tower got: "flipkern" or the reason it was left stock. A
config that does not build offline (an HF text tower needs its config
downloaded, ...) is reported with the error.
"""
import argparse
import contextlib
import copy
import json
import os
import sys
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def cut_timm_trunks(values=False, depth=1, **overrides):
    """timm.create_model as open_clip's TimmModel calls it, with ``depth`` where the model takes
    it and ``overrides`` (e.g. embed_dim). Without ``values`` the trunk is built on the meta
    device and given uninitialized CPU storage: apply_to_timm inspects the structure, not the
    values, and nothing big is initialized."""
    import open_clip.timm_model as tm
    import timm
    create = timm.create_model

    def create_cut(name, **kw):
        with contextlib.nullcontext() if values else torch.device("meta"):
            try:
                trunk = create(name, depth=depth, **overrides, **kw)
            except TypeError:  # a family without a `depth` argument (ConvNeXt, ...)
                trunk = create(name, **kw)
        return trunk if values else trunk.to_empty(device="cpu")

    tm.timm.create_model = create_cut
    try:
        yield
    finally:
        tm.timm.create_model = create


def _cut_config(cfg, layers=1, vocab=None):
    """The model config with its transformer towers cut to ``layers`` layers (and the text
    vocabulary to ``vocab`` entries: a 250k-token multilingual embedding is gigabytes to
    initialize, and no patch decision depends on its size)."""
    cfg = copy.deepcopy(cfg)
    if vocab and cfg.get("text_cfg", {}).get("vocab_size", 0) > vocab:
        cfg["text_cfg"]["vocab_size"] = vocab
    for tower in ("vision_cfg", "text_cfg"):
        t = cfg.get(tower, {})
        if isinstance(t.get("layers"), int):
            t["layers"] = layers
        elif isinstance(t.get("layers"), (list, tuple)):  # ModifiedResNet stages
            t["layers"] = [1] * len(t["layers"])
    return cfg


def build_cut(name, values=False, timm_overrides=None, layers=1, vocab=None, text_overrides=None, **create_kwargs):
    """open_clip.create_model(name) offline, pretrained=None, its towers cut to ``layers`` layers
    (text_overrides: text_cfg entries to replace, e.g. a smaller width for tests)."""
    import open_clip
    cfg = _cut_config(open_clip.get_model_config(name), layers, vocab)
    cfg["text_cfg"].update(text_overrides or {})
    if create_kwargs.get("force_patch_dropout") is not None:
        # create_model applies force_patch_dropout to its own copy of the config, which the
        # vision_cfg passed below replaces: set it in that one
        cfg["vision_cfg"]["patch_dropout"] = create_kwargs.pop("force_patch_dropout")
    with cut_timm_trunks(values, layers, **(timm_overrides or {})):
        return open_clip.create_model(name, pretrained=None, pretrained_text=False, vision_cfg=cfg["vision_cfg"],
                                      text_cfg=cfg["text_cfg"], **create_kwargs)


def coverage(name):
    """{"visual": ..., "text": ...} for one config, or {"error": ...} if it does not build."""
    import flipkern
    try:
        model = build_cut(name, vocab=1024)
    except Exception as e:  # noqa: BLE001 -- a config that does not build offline is a row, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    return flipkern.apply_to_open_clip(model)


def summarize(rows):
    built = {n: r for n, r in rows.items() if "error" not in r}
    both = [n for n, r in built.items() if r["visual"] == r["text"] == "flipkern"]
    return {
        "configs": len(rows),
        "built_offline": len(built),
        "visual_flipkern": sum(r["visual"] == "flipkern" for r in built.values()),
        "text_flipkern": sum(r["text"] == "flipkern" for r in built.values()),
        "both_flipkern": len(both),
        "visual_reasons": Counter(r["visual"] for r in built.values() if r["visual"] != "flipkern"),
        "text_reasons": Counter(r["text"] for r in built.values() if r["text"] != "flipkern"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="configs (default: every open_clip config)")
    parser.add_argument("--json", help="also write the rows and the summary here")
    args = parser.parse_args(argv)
    import open_clip
    names = args.names or open_clip.list_models()
    rows = {}
    for name in names:
        rows[name] = coverage(name)
        r = rows[name]
        print(f"{name:40s} " + (f"does not build: {r['error']}" if "error" in r
                                 else f"visual: {r['visual']} | text: {r['text']}"), flush=True)
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "summary": summary, "rows": rows}, f, indent=1)
    return 0


import torch  # noqa: E402  (after the environment: HF offline before any import reads it)

if __name__ == "__main__":
    sys.exit(main())
