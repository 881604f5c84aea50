"""apply_to_open_clip on open_clip configs with a timm vision tower (SigLIP, EVA02), and the
coverage script (benchmarks/open_clip_coverage.py) on a sample of configs.

Configs are built offline with pretrained=None, their towers cut to one layer.
"""
import copy
import os
import sys

import pytest
import torch

import flipkern

pytest.importorskip("open_clip")
pytest.importorskip("timm")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import open_clip_coverage  # noqa: E402

NOT_VIT = "not open_clip's VisionTransformer"


@pytest.mark.parametrize("name, visual, text", [
    ("ViT-B-32", "flipkern", "flipkern"),
    ("ViT-B-16-SigLIP", "flipkern", "flipkern"),
    ("ViT-SO400M-14-SigLIP-384", "flipkern", "flipkern"),  # 14 px patches do not divide 384 px
    ("EVA02-B-16", "flipkern", "flipkern"),
    ("EVA02-E-14", "flipkern", "flipkern"),  # post-norm blocks, no rope
    ("EVA01-g-14", "flipkern", "flipkern"),
    ("coca_ViT-B-32", "attentional pooling", "a class token appended to the text (embed_cls, CoCa)"),
    ("RN50", "visual is ModifiedResNet", "flipkern"),
])
def test_coverage_of_a_sample_of_configs(name, visual, text):
    report = open_clip_coverage.coverage(name)
    assert report["visual"].startswith(visual), report
    assert report["text"].startswith(text), report


def test_coverage_summary_counts():
    rows = {"a": {"visual": "flipkern", "text": "flipkern"}, "b": {"visual": "flipkern", "text": "why"},
            "c": {"error": "OSError: offline"}}
    s = open_clip_coverage.summarize(rows)
    assert (s["configs"], s["built_offline"], s["visual_flipkern"], s["text_flipkern"], s["both_flipkern"]) \
        == (3, 2, 2, 1, 1)
    assert s["text_reasons"] == {"why": 1}


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "EVA02-B-16"])
@pytest.mark.parametrize("patch_dropout", [0.0, 0.5, 0.75])
def test_timm_image_tower_patched_matches_open_clip(name, patch_dropout):
    torch.manual_seed(0)
    model = open_clip_coverage.build_cut(name, values=True,
                                         timm_overrides=dict(embed_dim=64, num_heads=2),
                                         force_patch_dropout=patch_dropout).double().train()
    assert getattr(model.visual.trunk.patch_drop, "prob", 0.0) == patch_dropout  # the dropout is in the model
    with torch.no_grad():  # timm inits biases and the attention-pool latent to constants: make them count
        for p in model.visual.parameters():
            if p.dim() < 2:
                p.normal_(0, 0.2)
    patched = copy.deepcopy(model)
    report = flipkern.apply_to_open_clip(patched)
    assert report == {"visual": "flipkern", "text": "flipkern"}
    images = torch.randn(3, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(m):
        m.zero_grad()
        torch.manual_seed(4)  # timm PatchDropout's draw
        out = m.encode_image(images)
        out.square().sum().backward()
        return [out] + [p.grad for p in m.visual.parameters()]

    for i, (a, b) in enumerate(zip(run(patched), run(model))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"tensor {i}")
    assert list(patched.state_dict()) == list(model.state_dict())
