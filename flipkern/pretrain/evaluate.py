"""Evaluation: zero-shot classification and image<->text retrieval.

Zero-shot (datasets with ``classnames`` and ``templates``, e.g. the synthetic
one): each class embedding is the mean of the normalized embeddings of its
prompts, renormalized; an image is classified by cosine similarity; top-1 and
top-5 accuracy on the held-out split.

Retrieval: over the evaluated samples, each image's own caption is the one
correct text (and vice versa); recall@k counts how often it ranks in the top k
(ties count against it).
"""
import contextlib

import torch
import torch.nn.functional as F

from ..data.loader import make_eval_loader


def _features(model, loader, device, autocast):
    img_f, txt_f, idx = [], [], []
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        with autocast():
            fi = model.encode_image(images, normalize=True)
            ft = model.encode_text(tokens, normalize=True)
        img_f.append(F.normalize(fi.float(), dim=-1))
        txt_f.append(F.normalize(ft.float(), dim=-1))
        idx.append(batch["index"])
    return torch.cat(img_f), torch.cat(txt_f), torch.cat(idx)


def _recall(sim, ks):
    """sim [n, n], correct pairs on the diagonal -> {k: recall}."""
    correct = sim.diagonal().unsqueeze(1)
    rank = (sim > correct).sum(1)  # 0 = best
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def classifier_weights(model, tokenizer, prompts, device, autocast, batch_size=256):
    """prompts [C][T] strings -> [C, D]: mean of the normalized prompt embeddings, renormalized."""
    C, T = len(prompts), len(prompts[0])
    flat = [p for ps in prompts for p in ps]
    feats = []
    for s in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[s:s + batch_size]).to(device)
        with autocast():
            feats.append(F.normalize(model.encode_text(tokens, normalize=True).float(), dim=-1))
    feats = torch.cat(feats).view(C, T, -1)
    return F.normalize(feats.mean(1), dim=-1)


@torch.no_grad()
def evaluate(model, dataset, tokenizer, device, *, batch_size=256, num_samples=None, autocast=None,
             zeroshot_prompts=None):
    """-> dict of metrics (fractions in [0, 1])."""
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    try:
        loader = make_eval_loader(dataset, tokenizer, batch_size=batch_size, num_samples=num_samples)
        img, txt, idx = _features(model, loader, device, autocast)
        out = {"eval_samples": int(img.shape[0])}
        sim = img @ txt.T
        for k, v in _recall(sim, (1, 5)).items():
            out[f"i2t_r@{k}"] = v
        for k, v in _recall(sim.T, (1, 5)).items():
            out[f"t2i_r@{k}"] = v
        if hasattr(dataset, "classnames") and hasattr(dataset, "label"):
            if zeroshot_prompts is None:
                zeroshot_prompts = dataset.zeroshot_prompts()
            w = classifier_weights(model, tokenizer, zeroshot_prompts, device, autocast)
            labels = torch.tensor([dataset.label(int(i)) for i in idx], device=img.device)
            logits = img @ w.T
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            out["zeroshot_top1"] = (top5[:, 0] == labels).float().mean().item()
            out["zeroshot_top5"] = (top5 == labels[:, None]).any(1).float().mean().item()
            out["num_classes"] = len(zeroshot_prompts)
        return out
    finally:
        model.train(was_training)
