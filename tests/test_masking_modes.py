"""The masking modes and MAE objective in the pretraining loop: attentive masking's
scores, top-K and random share, its EMA tower (update, checkpoint, bit-exact resume),
--mae-weight / --objective mae, 2 processes == 1, and the argument errors."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from test_fastpath import MICRO
from test_pretrain import MICRO as MICRO_ARGS
from test_pretrain import (
    _env,
    _eval_records,
    _final_state,
    _train_records,
    assert_same_trajectory,
    run_one_and_two_processes,
)

from flipkern.pretrain import checkpoint as ckpt
from flipkern.pretrain import masking_modes as mm
from flipkern.pretrain.cli import main
from flipkern.reference import vit as rvit


def _visual(cls_token=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    visual = rvit.VisionTransformer(dataclasses.replace(MICRO.vision, cls_token=cls_token), MICRO.embed_dim)
    rvit.init_weights(visual)
    return visual.to(dtype)


def _images(batch=6, dtype=torch.float64):
    v = MICRO.vision
    return torch.randn(batch, v.channels, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1),
                       dtype=dtype)


def _attentive(visual, random_share=0.0, global_batch=6, rank=0):
    import contextlib
    return mm.AttentiveMasking(visual, decay=0.9, random_share=random_share, seed=0, fast=True,
                               autocast=contextlib.nullcontext, global_batch=global_batch, rank=rank)


@pytest.mark.parametrize("cls_token", [False, True])
def test_patch_scores_fast_path_matches_reference_and_is_a_cosine(cls_token):
    visual, images = _visual(cls_token), _images()
    fast = mm.patch_scores(visual, images, fast=True)
    ref = mm.patch_scores(visual, images, fast=False)
    assert fast.shape == (6, MICRO.vision.num_patches)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)
    # by hand: patch n's projected token against the pooled embedding
    x = visual.forward_tokens(images)
    tok = visual.proj(visual.patch_tokens(x))
    pooled = visual(images)
    expected = torch.nn.functional.cosine_similarity(tok, pooled[:, None, :], dim=-1)
    torch.testing.assert_close(ref, expected.float(), rtol=1e-6, atol=1e-6)


def test_attentive_keeps_the_highest_scored_patches():
    visual, images = _visual(), _images()
    masking = _attentive(visual)
    loader_ids = torch.arange(4).expand(6, 4)  # the loader's random draw only sets K
    ids = masking.select(images, loader_ids, data_step=0)
    scores = mm.patch_scores(masking.ema, images)
    assert ids.shape == (6, 4) and (ids.diff(dim=1) > 0).all()
    for b in range(6):
        assert set(ids[b].tolist()) == set(scores[b].topk(4).indices.tolist())
    assert masking.select(images, None, data_step=0) is None  # an unmasked step stays unmasked
    assert masking.calls == 1 and masking.summary()["ema_forward_s"] > 0


def test_random_share_keeps_the_attentive_top_and_random_others():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 16, generator=g)
    K = 8
    draws = []
    for seed in (1, 2):
        noise = torch.rand(64, 16, generator=torch.Generator().manual_seed(seed))
        ids = torch.sort(torch.topk(mm.keep_priority(scores, K, 0.5, noise), K).indices, dim=1).values
        top = scores.topk(4).indices
        for b in range(64):
            assert set(top[b].tolist()) <= set(ids[b].tolist()) and len(set(ids[b].tolist())) == K
        draws.append(ids)
    assert not torch.equal(draws[0], draws[1])  # the other 4 follow the noise
    torch.testing.assert_close(mm.keep_priority(scores, K, 0.0, noise), scores, rtol=0, atol=0)
    all_random = mm.keep_priority(scores, K, 1.0, noise)
    torch.testing.assert_close(all_random, noise, rtol=0, atol=0)


def test_random_share_noise_is_the_same_with_any_number_of_processes():
    visual = _visual()
    one = _attentive(visual, 0.5, global_batch=8)
    two = [_attentive(visual, 0.5, global_batch=8, rank=r) for r in (0, 1)]
    scores = torch.zeros(4, 16)
    whole = one._noise(torch.zeros(8, 16), data_step=5)
    torch.testing.assert_close(torch.cat([m._noise(scores, data_step=5) for m in two]), whole, rtol=0, atol=0)
    assert not torch.equal(one._noise(torch.zeros(8, 16), data_step=6), whole)


def test_ema_update_is_a_lerp_towards_the_live_tower():
    visual = _visual()
    masking = _attentive(visual)
    before = [p.clone() for p in masking.ema.parameters()]
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(1.0)
    masking.update(visual)
    for e, b, p in zip(masking.ema.parameters(), before, visual.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p, rtol=1e-12, atol=1e-12)
        assert not e.requires_grad
    assert all(p.requires_grad for p in visual.parameters())  # the live tower is untouched


# ----------------------------------------------------------------------------- in the training loop

ATTENTIVE_MAE = ["--masking", "attentive", "--attentive-random-share", "0.5", "--ema-decay", "0.9",
                 "--mae-weight", "0.5", "--mae-decoder-width", "16", "--mae-decoder-heads", "2"]
MAE_ONLY = ["--objective", "mae", "--mae-decoder-width", "16", "--mae-decoder-heads", "2"]


@pytest.mark.parametrize("extra", [ATTENTIVE_MAE, MAE_ONLY], ids=["attentive+mae", "objective-mae"])
def test_resume_matches_uninterrupted(tmp_path, extra):
    common = MICRO_ARGS + extra + ["--steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "0",
                                   "--mask-ratio", "0.75"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--output-dir", a]) == 0
    assert main(common + ["--output-dir", b, "--debug-stop-after", "3"]) == 0
    r = subprocess.run([sys.executable, "-m", "flipkern.pretrain", *common, "--output-dir", b],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    ra, rb = _train_records(a), _train_records(b)
    assert ra == rb  # bit-exact losses, lrs, grad norms
    # a reconstruction loss on every masked step (--objective mae: all 5; else the last is unmasked tuning)
    mae = [rec["mae_loss"] for rec in _read(a) if rec["type"] == "train" and "mae_loss" in rec]
    assert len(mae) == sum(rec["masked"] for rec in ra) == (5 if "--objective" in extra else 4)
    assert mae == [rec["mae_loss"] for rec in _read(b) if "mae_loss" in rec]
    assert _eval_records(a)[-1] | {"step": 0} == _eval_records(b)[-1] | {"step": 0}
    sa, sb = _final_state(a), _final_state(b)
    for part in ("model", "mae_decoder") + (("ema",) if "attentive" in extra else ()):
        assert sa[part] and sa[part].keys() == sb[part].keys()
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)
    first = ckpt.load(ckpt.list_checkpoints(a)[0][1])
    if "attentive" in extra:  # the EMA moved, and it is not the live tower
        assert not torch.equal(first["ema"]["proj.weight"], sa["ema"]["proj.weight"])
        assert not torch.equal(sa["ema"]["proj.weight"], sa["model"]["visual.proj.weight"])
    else:  # --objective mae trains the vision tower only
        assert sa["ema"] is None
        for k, v in first["model"].items():
            assert torch.equal(v, sa["model"][k]) != k.startswith("visual.") or k == "visual.proj.weight", k


def _read(out):
    from flipkern.pretrain.metrics import read_metrics
    return read_metrics(os.path.join(out, "metrics.jsonl"))


def test_two_processes_match_one(tmp_path):
    common = MICRO_ARGS + ATTENTIVE_MAE + ["--steps", "3", "--checkpoint-every", "0", "--no-eval",
                                           "--mask-ratio", "0.5", "--unmasked-tune-steps", "1"]
    one, two = run_one_and_two_processes(tmp_path, common, timeout=900)
    assert [x["masked"] for x in _train_records(one)] == [x["masked"] for x in _train_records(two)] \
        == [True, True, False]
    assert_same_trajectory(one, two, parts=("model", "mae_decoder", "ema"))


@pytest.mark.parametrize("argv, message", [
    (["--mae-weight", "1", "--mask-ratio", "0"], "--mask-ratio"),
    (["--objective", "mae", "--mask-ratio", "0"], "--mask-ratio"),
    (["--objective", "mae", "--unmasked-tune-steps", "1"], "--unmasked-tune-steps"),
    (["--masking", "attentive", "--mask-ratio", "0"], "--mask-ratio"),
    (["--mae-weight", "1", "--mae-decoder-width", "30"], "--mae-decoder"),
    (["--mae-weight", "-1"], "--mae-weight"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--attentive-random-share", "1.5"], "--attentive-random-share"),
    (["--masking", "topk"], "--masking"),
])
def test_bad_args_exit_2_naming_the_argument(tmp_path, argv, message, capsys):
    try:
        code = main(MICRO_ARGS + ["--steps", "2", "--output-dir", str(tmp_path / "o"), *argv])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("first, then", [([], ["--masking", "attentive"]), (["--mae-weight", "1"], []),
                                         ([], ["--mae-weight", "1"])])
def test_resuming_another_mode_or_objective_says_why_not(tmp_path, capsys, first, then):
    out = str(tmp_path / "o")
    assert main(MICRO_ARGS + ["--steps", "2", "--no-eval", "--output-dir", out, *first]) == 0
    assert main(MICRO_ARGS + ["--steps", "3", "--no-eval", "--output-dir", out, *then]) == 2
    assert "does not fit this run's --objective/--mae-weight/--masking" in capsys.readouterr().err
