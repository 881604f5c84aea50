"""The pretraining data layer: synthetic dataset, tokenizers, CSV / tar shards,
skipping of bad samples, and rank-independent order and masks."""
import gzip
import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flipkern.data import (
    BPETokenizer,
    ByteTokenizer,
    CsvDataset,
    DataError,
    GlobalBatchSampler,
    SyntheticConfig,
    SyntheticShapes,
    TarShardDataset,
    expand_braces,
    expand_urls,
    make_train_loader,
    preprocess,
    sample_keep_indices,
)
from flipkern.data.loader import SkipBad, epoch_permutation

# ----------------------------------------------------------------------------- synthetic


def _digest(arr):
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def test_synthetic_is_deterministic_per_index():
    a = SyntheticShapes("train", 1000, seed=3)
    b = SyntheticShapes("train", 1000, seed=3)
    for i in (0, 1, 17, 999):
        sa, sb = a.sample(i), b.sample(i)
        assert np.array_equal(sa["image"], sb["image"])
        assert sa["caption"] == sb["caption"] and sa["label"] == sb["label"]
        ia, ca = a[i]
        ib, cb = b[i]
        assert torch.equal(ia, ib) and ca == cb
    # order of access does not matter: index 5 alone equals index 5 after others
    assert np.array_equal(SyntheticShapes("train", 1000, seed=3).sample(5)["image"], a.sample(5)["image"])
    # another seed is another dataset
    c = SyntheticShapes("train", 1000, seed=4)
    assert not np.array_equal(a.sample(0)["image"], c.sample(0)["image"])


def test_synthetic_samples_shapes_and_labels():
    cfg = SyntheticConfig(image_size=24)
    ds = SyntheticShapes("train", 200, seed=0, config=cfg)
    img, cap = ds[7]
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32
    assert isinstance(cap, str) and cap
    assert ds.num_classes == len(cfg.colours) * len(cfg.shapes)
    labels = []
    for i in range(200):
        s = ds.sample(i)
        assert ds.label(i) == s["label"]
        assert ds.classnames[s["label"]] == f"{s['colour']} {s['shape']}"
        assert s["colour"] in s["caption"] and s["shape"] in s["caption"]
        assert " a o" not in s["caption"]  # articles fixed ("an orange")
        labels.append(s["label"])
    assert len(set(labels)) > ds.num_classes * 0.8  # classes are all drawn
    assert len({ds.sample(i)["caption"] for i in range(200)}) > 100  # varied sentences
    prompts = ds.zeroshot_prompts()
    assert len(prompts) == ds.num_classes and all(len(p) == len(ds.templates) for p in prompts)
    with pytest.raises(IndexError):
        ds[200]


def test_synthetic_heldout_split_is_disjoint():
    train = SyntheticShapes("train", 100_000, seed=0, config=SyntheticConfig(image_size=16))
    val = SyntheticShapes("val", 1000, seed=0, config=SyntheticConfig(image_size=16))
    n = 400
    train_hashes = {_digest(train.sample(i)["image"]) for i in range(n)}
    val_hashes = {_digest(val.sample(i)["image"]) for i in range(n)}
    assert len(train_hashes) == n and len(val_hashes) == n
    assert not train_hashes & val_hashes
    # not the same random draws under another name either: positions differ at the same index
    t = [train.attributes(i)["cx"] for i in range(50)]
    v = [val.attributes(i)["cx"] for i in range(50)]
    assert all(a != b for a, b in zip(t, v))


@pytest.mark.parametrize("spread", [0.0, 0.25, 1.0])
def test_synthetic_position_spread_bounds_the_centre(spread):
    H = 32
    ds = SyntheticShapes("train", 2000, seed=0, config=SyntheticConfig(image_size=H, position_spread=spread))
    offsets = []
    for i in range(2000):
        a = ds.attributes(i)
        reach = (H / 2 - a["radius"] * 1.05) * spread  # the shape (with its margin) always fits
        for c in (a["cx"], a["cy"]):
            assert abs(c - H / 2) <= reach + 1e-9
            offsets.append(abs(c - H / 2) / max(H / 2 - a["radius"] * 1.05, 1e-9))
    if spread:  # and the centre does use the whole allowed range, uniformly
        assert max(offsets) > 0.95 * spread and 0.4 * spread < sum(offsets) / len(offsets) < 0.6 * spread


def test_synthetic_bad_config():
    with pytest.raises(ValueError, match="unknown colour"):
        SyntheticConfig(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="unknown shape"):
        SyntheticConfig(shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="position_spread"):
        SyntheticConfig(position_spread=1.5)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_padding_truncation():
    tok = ByteTokenizer(context_length=16)
    assert tok.vocab_size == 259 and tok.pad_id == 0
    out = tok(["a red circle", "héllo"])
    assert out.shape == (2, 16) and out.dtype == torch.int64
    for row, text in zip(out, ["a red circle", "héllo"]):
        n = len(text.encode()) + 2
        assert row[0] == tok.sot_id and row[n - 1] == tok.eot_id
        assert (row[n:] == 0).all() and (row[:n] != 0).all()
        assert tok.decode(row) == text
        assert int(row.max()) < tok.vocab_size
    long = tok(["x" * 100])[0]
    assert long[0] == tok.sot_id and long[-1] == tok.eot_id and (long[1:-1] == ord("x") + 1).all()
    assert tok(["x" * 14])[0, -1] == tok.eot_id  # exactly fits
    assert tok([""])[0, :3].tolist() == [tok.sot_id, tok.eot_id, 0]
    # eot is the last non-pad token in every row
    rows = tok(["a", "bb " * 20, "ccc"])
    last = (rows != 0).long().cumsum(1).argmax(1)
    assert (rows[torch.arange(3), last] == tok.eot_id).all()


def _write_bpe_vocab(path, merges):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: test\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def test_bpe_tokenizer_with_a_local_vocab(tmp_path):
    merges = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r")]
    path = str(tmp_path / "bpe_test.txt.gz")
    _write_bpe_vocab(path, merges)
    tok = BPETokenizer(path, context_length=12)
    assert tok.vocab_size == 512 + len(merges) + 2
    assert tok.sot_id == tok.vocab_size - 2 and tok.eot_id == tok.vocab_size - 1
    ids = tok.encode("The RED")
    assert ids == [tok.encoder["the</w>"], tok.encoder["red</w>"]]  # lowercased, merged by rank
    assert tok.encode("circle")[0] == tok.encoder["cir"]
    assert tok.decode(tok.encode("the red circle!")) == "the red circle !"
    out = tok(["the red", "the " * 30])
    assert out.shape == (2, 12) and out.dtype == torch.int64
    assert out[0, :4].tolist() == [tok.sot_id, tok.encoder["the</w>"], tok.encoder["red</w>"], tok.eot_id]
    assert (out[0, 4:] == 0).all()
    assert out[1, -1] == tok.eot_id
    assert tok.decode(out[0]) == "the red"


def test_bpe_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        BPETokenizer(str(tmp_path / "nope.txt.gz"))


# ----------------------------------------------------------------------------- real data


def _png_bytes(colour, size=(20, 12)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_resize_center_crop():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left, cropped away
    x = preprocess(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    red = preprocess(Image.new("RGB", (16, 16), (255, 0, 0)), 16)
    torch.testing.assert_close(x[:, :, 4:12], red[:, :, 4:12], atol=0.05, rtol=0)


def _make_csv(tmp_path, sep=","):
    d = tmp_path / "imgs"
    d.mkdir()
    rows = [("a.png", "a red thing"), ("b.png", "a green thing"), ("c.png", "a blue thing"),
            ("bad.png", "a corrupt file"), ("missing.png", "no such file"), ("d.png", "   ")]
    colours = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255), "d.png": (9, 9, 9)}
    for name, c in colours.items():
        (d / name).write_bytes(_png_bytes(c))
    (d / "bad.png").write_bytes(b"this is not an image")
    path = tmp_path / ("data.csv" if sep == "," else "data.tsv")
    with open(path, "w") as f:
        f.write(f"filepath{sep}title\n")
        for name, cap in rows:
            f.write(f"imgs/{name}{sep}{cap}\n")
    return str(path)


def test_csv_dataset_skips_and_counts(tmp_path):
    path = _make_csv(tmp_path)
    ds = CsvDataset(path, 8, sep=",")
    assert len(ds) == 4  # a, b, c and the corrupt one (found at decode time)
    assert dict(ds.skipped) == {"missing_image": 1, "empty_caption": 1}
    img, cap = ds[0]
    assert img.shape == (3, 8, 8) and cap == "a red thing"
    wrapped = SkipBad(ds)
    bad_idx = [i for i in range(len(ds)) if "corrupt" in ds.caption(i)][0]
    got = wrapped[(0, 0, bad_idx, None)]
    assert got["bad"] and got["bad"][0][0] == bad_idx  # replaced and reported
    assert got["index"] != bad_idx


def test_tsv_and_custom_keys(tmp_path):
    (tmp_path / "x.png").write_bytes(_png_bytes((1, 2, 3)))
    p = tmp_path / "d.tsv"
    p.write_text("img\tcap\textra\nx.png\thello there\t1\n")
    ds = CsvDataset(str(p), 8, img_key="img", caption_key="cap", sep="\t")
    assert len(ds) == 1 and ds[0][1] == "hello there"
    with pytest.raises(DataError, match="no column 'title'"):
        CsvDataset(str(p), 8, img_key="img", caption_key="title", sep="\t")
    with pytest.raises(DataError, match="no such file"):
        CsvDataset(str(tmp_path / "nope.csv"), 8)


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tf:
            for k in range(3):
                key = f"{s:03d}{k:04d}"
                _add(tf, f"{key}.png", _png_bytes((40 * k, 50 * s, 7)))
                _add(tf, f"{key}.txt", f"caption {s} {k}".encode())
            _add(tf, "empty.png", _png_bytes((1, 1, 1)))
            _add(tf, "empty.txt", b"  \n")
            _add(tf, "noimage.txt", b"a caption without an image")
            _add(tf, "corrupt.jpg", b"\xff\xd8\xff garbage")
            _add(tf, "corrupt.txt", b"a corrupt jpeg")
    ds = TarShardDataset(str(tmp_path / "shard-{000..001}.tar"), 8)
    assert len(ds) == 2 * 4  # 3 good + 1 corrupt (found at decode) per shard
    assert dict(ds.skipped) == {"empty_caption": 2, "missing_image": 2}
    caps = {ds.caption(i) for i in range(len(ds))}
    assert "caption 1 2" in caps
    i = [j for j in range(len(ds)) if ds.caption(j) == "caption 1 2"][0]
    img, cap = ds[i]
    expected = preprocess(Image.open(io.BytesIO(_png_bytes((80, 50, 7)))), 8)
    torch.testing.assert_close(img, expected)
    # through the loader: corrupt images are replaced and counted, never a crash
    loader = make_train_loader(ds, ByteTokenizer(16), global_batch=8, num_tokens=4, seed=0, end_step=1)
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 8, 8)
    assert len(batch["bad"]) == 2
    with pytest.raises(DataError, match="no such file"):
        TarShardDataset(str(tmp_path / "shard-{000..002}.tar"), 8)
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DataError, match="cannot read shard"):
        TarShardDataset(str(tmp_path / "junk.tar"), 8)


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_urls("x-{0..1}.tar::y.tar") == ["x-0.tar", "x-1.tar", "y.tar"]


# ----------------------------------------------------------------------------- order and masks


def test_sampler_covers_epochs_without_repeats():
    s = GlobalBatchSampler(20, 6, seed=1, start_step=0, end_step=6)
    assert s.steps_per_epoch == 3
    e0 = torch.cat([s.global_indices(k) for k in range(3)])
    e1 = torch.cat([s.global_indices(k) for k in range(3, 6)])
    assert len(set(e0.tolist())) == 18 and len(set(e1.tolist())) == 18
    assert not torch.equal(e0, e1)
    assert torch.equal(epoch_permutation(20, 1, 0)[:18], e0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_sharding_is_independent_of_world_size(world_size):
    ds = SyntheticShapes("train", 64, seed=0, config=SyntheticConfig(image_size=16))
    tok = ByteTokenizer(24)
    G, N = 8, 16

    def keep(step):
        return 8 if step < 3 else None  # masked, then the unmasked tail

    def batches(W, r, start=0):
        return list(make_train_loader(ds, tok, global_batch=G, num_tokens=N, seed=5, world_size=W, rank=r,
                                      start_step=start, end_step=4, num_keep_fn=keep))

    one = batches(1, 0)
    many = [batches(world_size, r) for r in range(world_size)]
    for step in range(4):
        for key in ("images", "tokens", "index"):
            assert torch.equal(one[step][key], torch.cat([m[step][key] for m in many]))
        if step < 3:
            assert one[step]["ids_keep"].shape == (G, 8)
            assert torch.equal(one[step]["ids_keep"], torch.cat([m[step]["ids_keep"] for m in many]))
        else:
            assert one[step]["ids_keep"] is None
    # a loader started at step 2 (a resumed run) sees the same batches and masks
    resumed = batches(1, 0, start=2)
    assert torch.equal(one[2]["index"], resumed[0]["index"])
    assert torch.equal(one[2]["ids_keep"], resumed[0]["ids_keep"])
    assert torch.equal(one[3]["images"], resumed[1]["images"])


def test_masks_differ_between_samples_and_steps():
    a = sample_keep_indices(0, 0, 0, 64, 16)
    assert a.shape == (16,) and a.dtype == torch.int64 and len(set(a.tolist())) == 16
    assert torch.equal(a, sample_keep_indices(0, 0, 0, 64, 16))
    assert not torch.equal(a, sample_keep_indices(0, 0, 1, 64, 16))
    assert not torch.equal(a, sample_keep_indices(0, 1, 0, 64, 16))
    assert not torch.equal(a, sample_keep_indices(1, 0, 0, 64, 16))


def test_loader_with_workers_matches_in_process():
    ds = SyntheticShapes("train", 64, seed=0, config=SyntheticConfig(image_size=16))
    tok = ByteTokenizer(24)
    kw = dict(global_batch=8, num_tokens=16, seed=0, end_step=3, num_keep_fn=lambda s: 4)
    a = list(make_train_loader(ds, tok, workers=0, **kw))
    b = list(make_train_loader(ds, tok, workers=2, **kw))
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["ids_keep"], y["ids_keep"])
