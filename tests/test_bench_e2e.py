"""benchmarks/bench_e2e.py and plot_e2e.py run end to end (a tiny model, one step: no timing is checked)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_e2e  # noqa: E402
import plot_e2e  # noqa: E402

from flipkern.reference import clip as rclip  # noqa: E402


def test_native_forward_is_the_reference_models_forward():
    """The PyTorch-native path computes the same CLIP as the reference model."""
    cfg = rclip.PRESETS["tiny"]
    torch.manual_seed(0)
    model = rclip.CLIP(cfg).double()
    images, tokens, _ = bench_e2e.make_data(cfg, 4, 10, "cpu")
    ids = torch.stack([torch.randperm(cfg.vision.num_patches)[:16].sort().values for _ in range(4)])
    ref = model(images.double(), tokens, ids_keep=ids)
    out = bench_e2e.native_forward(model, images.double(), tokens, ids)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12, msg=k)


def test_make_data_captions_end_in_eot_at_about_the_asked_length():
    cfg = rclip.PRESETS["ViT-Ti/16"]
    _, tokens, lengths = bench_e2e.make_data(cfg, 64, 16, "cpu")
    eot = (tokens == cfg.text.eot_id).int().argmax(1) + 1
    assert torch.equal(eot, lengths)
    assert 14 <= lengths.float().mean() <= 18
    assert (tokens[torch.arange(77)[None, :] >= lengths[:, None]] == 0).all()


def test_benchmark_and_plot_run(tmp_path):
    out = tmp_path / "e2e.json"
    results = bench_e2e.main(["--model", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0",
                              "--masks", "0", "0.5", "--same-process", "--json", str(out)])
    assert {(r["path"], r["mask"]) for r in results} == {(p, m) for p in bench_e2e.PATHS for m in (0.0, 0.5)}
    data = json.loads(out.read_text())
    assert set(data["ratios"]) == {"fast@0.0 / native@0.0", "fast@0.0 / reference@0.0", "fast@0.5 / native@0",
                                   "fast@0.5 / native@0.5", "fast@0.5 / reference@0.5"}
    assert all(r["img_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in data["results"])
    png = tmp_path / "e2e.png"
    plot_e2e.main([str(out), "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="path must be one of"):
        bench_e2e.make_step("fastest", None)
