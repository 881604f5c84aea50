"""The benchmarks' own logic: the native-best baseline computes the reference CLIP, every case
runs the same masks, the caption length model is what it says, FLOP counting sees
flipkern's ops, and bench_e2e / report / plot run end to end (a tiny model, one step:
no timing is checked)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_e2e  # noqa: E402
import caption_lengths  # noqa: E402
import flops  # noqa: E402
import native  # noqa: E402
import plot_e2e  # noqa: E402
import report  # noqa: E402

import flipkern as fk  # noqa: E402
from flipkern.reference import clip as rclip  # noqa: E402


def _tiny_batch(B=4, captions="realistic"):
    cfg = rclip.PRESETS["tiny"]
    images, tokens, lengths = bench_e2e.make_data(cfg, B, captions, "cpu")
    ids = torch.stack([torch.randperm(cfg.vision.num_patches)[:6].sort().values for _ in range(B)])
    return cfg, images, tokens, lengths, ids


@pytest.mark.parametrize("masked", [False, True])
def test_native_forward_is_the_reference_models_forward(masked):
    """native-best (text cut to the longest caption, kept patches gathered before the linear)
    computes the same CLIP as the reference model, and its loss is the reference loss."""
    cfg, images, tokens, lengths, ids = _tiny_batch()
    assert int(lengths.max()) < cfg.text.context_length  # the cut really drops padding here
    ids = ids if masked else None
    torch.manual_seed(0)
    model = rclip.CLIP(cfg).double()
    ref = model(images.double(), tokens, ids_keep=ids)
    out = native.native_forward(model, images.double(), tokens, ids)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12, msg=k)
    torch.testing.assert_close(native.native_clip_loss(out), model.loss(ref), rtol=1e-12, atol=1e-12)


def test_open_clip_pair_runs_the_same_masks_and_loss():
    """open_clip stock and open_clip+fk: same parameters, same PatchDropout draw, same loss."""
    pytest.importorskip("open_clip")
    cfg, images, tokens, _, _ = _tiny_batch()
    losses = {}
    for case in ("open_clip", "open_clip+fk"):
        model, forward_loss = bench_e2e.build(case, cfg, 0.5, "cpu")
        losses[case] = forward_loss(images, tokens, 3)
    torch.testing.assert_close(losses["open_clip+fk"], losses["open_clip"], rtol=1e-4, atol=1e-5)


def test_reference_model_cases_run_the_same_masks_and_loss():
    cfg, images, tokens, _, _ = _tiny_batch()
    losses = {case: bench_e2e.build(case, cfg, 0.75, "cpu")[1](images, tokens, 5)
              for case in ("fast", "native", "reference")}
    for case in ("fast", "native"):
        torch.testing.assert_close(losses[case], losses["reference"], rtol=1e-4, atol=1e-5, msg=case)


def test_unknown_case_is_refused():
    with pytest.raises(ValueError, match="case must be one of"):
        bench_e2e.build("fastest", rclip.PRESETS["tiny"], 0.5, "cpu")


def test_realistic_caption_lengths_follow_the_stated_model():
    g = torch.Generator().manual_seed(1)
    x = caption_lengths.caption_lengths("realistic", 20000, generator=g).double()
    assert 13 <= float(x.median()) <= 15
    assert 0.01 <= float((x == 77).double().mean()) <= 0.06  # a few percent hit the context
    assert int(x.min()) >= 2
    for mean in (8, 16, 32):
        y = caption_lengths.caption_lengths(f"mean{mean}", 20000, generator=g).double()
        assert abs(float(y.mean()) - mean) < 0.1 * mean
    assert (caption_lengths.caption_lengths("full", 5) == 77).all()
    with pytest.raises(ValueError, match="caption kind"):
        caption_lengths.caption_lengths("long", 5)


def test_tokens_end_in_eot_at_their_length():
    cfg = rclip.PRESETS["ViT-Ti/16"]
    _, tokens, lengths = bench_e2e.make_data(cfg, 64, "realistic", "cpu")
    eot = (tokens == cfg.text.eot_id).int().argmax(1) + 1
    assert torch.equal(eot, lengths)
    assert torch.equal(tokens.argmax(1) + 1, lengths)  # open_clip's argmax pooling finds the eot
    assert (tokens[torch.arange(77)[None, :] >= lengths[:, None]] == 0).all()


def test_flop_count_sees_sdpa_and_flipkerns_varlen_attention():
    """The custom formulas: SDPA's CPU kernel and flipkern's op count the same work for the
    same sequences (causal: the triangle), forward and backward."""
    H, Dh, lengths = 2, 8, [3, 7]
    qkv = [torch.randn(2, H, 7, Dh, requires_grad=True) for _ in range(3)]
    sdpa_total, sdpa_ops = flops.count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True).sum().backward())
    want = flops.attention_flops([7, 7], [7, 7], H, Dh, causal=True)
    assert sdpa_total == 3 * want  # forward + backward (2x)
    assert any("flash_attention_for_cpu" in op for op in sdpa_ops)
    cu = fk.cu_seqlens_from_lengths(torch.tensor(lengths))
    q, k, v = (torch.randn(10, H, Dh, requires_grad=True) for _ in range(3))
    total, ops = flops.count_flops(lambda: fk.varlen_attention(q, k, v, cu, 7, causal=True).sum().backward())
    assert total == 3 * flops.attention_flops(lengths, lengths, H, Dh, causal=True) == 3 * 4 * (6 + 28) * H * Dh


def test_benchmark_report_and_plot_run(tmp_path):
    out = tmp_path / "e2e.json"
    data = bench_e2e.main(["--model", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0", "--repeats", "1",
                           "--masks", "0", "0.5", "--cases", "fast", "native", "--same-process",
                           "--json", str(out)])
    assert {(s["case"], s["mask"]) for s in data["summary"]} == {(c, m) for c in ("fast", "native")
                                                                 for m in (0.0, 0.5)}
    saved = json.loads(out.read_text())
    assert {r["name"] for r in saved["ratios"]} == {"fast / native", "FLIP masking: native@mask / native@0"}
    assert all(s["step_s_min"] > 0 and s["flops"] > 0 and s["peak_mem_bytes"] > 0 for s in saved["summary"])
    for key in ("machine", "threads", "commit", "torch", "loadavg_start", "loadavg_end", "command"):
        assert key in saved["run"]
    tables = report.e2e_tables(saved)
    assert "fast / native" in tables and "FLOP ratio" in tables
    png = tmp_path / "e2e.png"
    plot_e2e.main([str(out), "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_block_is_rewritten_from_the_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    data = dict(run=dict(machine=dict(cpu="cpu", cores=2), torch="t", commit="abc", command="cmd",
                         loadavg_start=[1.0, 1, 1], loadavg_end=[2.0, 2, 2]),
                config=dict(batch=4, device="cpu", dtype="float32", steps=1), repeats=1,
                summary=[dict(case=c, mask=0.0, step_s=[t], step_s_min=t, step_s_median=t, cpu_s_min=t, flops=f,
                              peak_mem_bytes=2**20, threads=2) for c, t, f in (("fast", 1.0, 10), ("native", 2.0, 30))],
                ratios=[dict(name="fast / native", mask=0.0, time_min=2.0, time_median=2.0, cpu_min=2.0, flops=3.0)])
    (results / "e2e.json").write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nkept\n{report.BEGIN}\nold numbers\n{report.END}\nkept too\n")
    report.update_readme(str(readme), str(results))
    text = readme.read_text()
    assert "old numbers" not in text and "kept\n" in text and "kept too" in text
    assert "| fast / native | 0.0 | 2.00x | 2.00x | 2.00x | 3.00x | 0.67 | 0.67 |" in text


def test_bench_accum_runs_end_to_end(tmp_path):
    """bench_accum's step (both passes over lazily made micro-batches) runs and writes its JSON;
    the contrastive batch is micro-batch x accum."""
    import bench_accum
    out = tmp_path / "accum.json"
    bench_accum.main(["--model", "tiny", "--micro-batch", "2", "--accum", "1", "3", "--checkpointing", "on",
                      "--threads", "1", "--json", str(out)])
    results = json.load(open(out))["results"]
    assert [r["contrastive_batch"] for r in results] == [2, 6]
    assert all(r["checkpointing"] and r["loss"] > 0 for r in results)
