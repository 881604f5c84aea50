"""Real image-caption data in open_clip conventions.

CsvDataset: a CSV/TSV file with a header; one column holds the image path
(``img_key``, open_clip's ``--csv-img-key``, default "filepath"), another the
caption (``caption_key``, default "title"); the separator is ``sep`` (open_clip's
default is a tab). Relative image paths are looked up next to the CSV file
first, then relative to the working directory.

TarShardDataset: WebDataset-style tar shards, members ``{key}.jpg|jpeg|png|webp``
plus ``{key}.txt``, read with the stdlib ``tarfile`` (no webdataset dependency).
Shard patterns may use brace expansion (``shards-{000..009}.tar``,
``{a,b}.tar``) and several patterns can be joined with ``::``. The shards are
indexed once (member offsets), so samples are read by random access.

Rows or members that cannot be used are skipped and counted (``skipped``, a
dict reason -> count): empty captions, missing image files, a key without an
image or without a caption. Images that turn out to be corrupt when decoded
raise ``CorruptSample`` from ``__getitem__``; the loader's wrapper
(flipkern.data.loader.SkipBad) replaces them and counts them, so training never
crashes on a bad file. A path that cannot be read at all raises ``DataError``
(the CLI turns it into a one-line error and exit code 2).
"""
import csv
import io
import os
import re
import sys
import tarfile
from collections import Counter

from PIL import Image

from .transforms import preprocess

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_EXTS = ("txt", "text", "caption")


class DataError(Exception):
    """A data path or file that cannot be used at all (exit code 2 in the CLI)."""


class CorruptSample(Exception):
    """One sample that cannot be decoded (skipped and counted by the loader)."""


def expand_braces(pattern):
    """``a-{000..002}.tar`` -> [a-000.tar, a-001.tar, a-002.tar]; ``{x,y}`` -> alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        lo_s, hi_s = r.group(1), r.group(2)
        lo, hi = int(lo_s), int(hi_s)
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (lo_s, hi_s))
        width = max(len(lo_s), len(hi_s)) if padded else 0
        step = 1 if hi >= lo else -1
        alts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        alts = body.split(",")
    out = []
    for alt in alts:
        out.extend(expand_braces(pattern[: m.start()] + alt + pattern[m.end():]))
    return out


def expand_urls(spec):
    """``p1::p2`` with brace patterns -> list of paths."""
    out = []
    for part in str(spec).split("::"):
        part = part.strip()
        if part:
            out.extend(expand_braces(part))
    return out


def _decode_image(data_or_path, image_size, what):
    try:
        with Image.open(data_or_path) as img:
            img.load()
            return preprocess(img, image_size)
    except Exception as e:  # PIL raises many kinds on bad data
        raise CorruptSample(f"{what}: {type(e).__name__}: {e}") from None


class CsvDataset:
    def __init__(self, path, image_size, img_key="filepath", caption_key="title", sep="\t"):
        self.path = path
        self.image_size = int(image_size)
        if not os.path.isfile(path):
            raise DataError(f"cannot read data file {path!r}: no such file")
        sep = {"\\t": "\t", "tab": "\t", "comma": ","}.get(sep, sep)
        if len(sep) != 1:
            raise DataError(f"--csv-separator must be one character, got {sep!r}")
        base = os.path.dirname(os.path.abspath(path))
        self.samples = []
        self.skipped = Counter()
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter=sep)
                fields = reader.fieldnames or []
                for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
                    if key not in fields:
                        raise DataError(f"{path}: no column {key!r} ({flag}); columns are {fields} "
                                        f"(separator {sep!r}, see --csv-separator)")
                for row in reader:
                    img = (row.get(img_key) or "").strip()
                    cap = (row.get(caption_key) or "").strip()
                    if not cap:
                        self.skipped["empty_caption"] += 1
                        continue
                    if not img:
                        self.skipped["missing_image"] += 1
                        continue
                    full = img if os.path.isabs(img) else os.path.join(base, img)
                    if not os.path.isfile(full):
                        if os.path.isfile(img):
                            full = img
                        else:
                            self.skipped["missing_image"] += 1
                            continue
                    self.samples.append((full, cap))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"cannot read data file {path!r}: {e}") from None
        if not self.samples:
            raise DataError(f"{path}: no usable samples (skipped: {dict(self.skipped) or 'none'})")

    def __len__(self):
        return len(self.samples)

    def caption(self, index):
        return self.samples[index][1]

    def __getitem__(self, index):
        path, cap = self.samples[index]
        return _decode_image(path, self.image_size, path), cap


def _split_key(name):
    """WebDataset convention: key = path up to the first '.' of the basename; ext = the rest."""
    d, b = os.path.split(name)
    if "." not in b:
        return None, None
    stem, ext = b.split(".", 1)
    return os.path.join(d, stem), ext.lower()


class TarShardDataset:
    def __init__(self, urls, image_size):
        self.image_size = int(image_size)
        self.shards = expand_urls(urls)
        if not self.shards:
            raise DataError(f"no shards in {urls!r}")
        for s in self.shards:
            if not os.path.isfile(s):
                raise DataError(f"cannot read shard {s!r}: no such file")
        self.samples = []  # (shard index, data offset, size, caption)
        self.skipped = Counter()
        for si, shard in enumerate(self.shards):
            self._index_shard(si, shard)
        if not self.samples:
            raise DataError(f"{urls}: no usable samples (skipped: {dict(self.skipped) or 'none'})")
        self._files = {}
        self._pid = None

    def _index_shard(self, si, shard):
        groups = {}
        try:
            tf = tarfile.open(shard, "r:")
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot read shard {shard!r}: {e}") from None
        with tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if key is None:
                        continue
                    g = groups.setdefault(key, {})
                    if ext in IMAGE_EXTS and "image" not in g:
                        g["image"] = (m.offset_data, m.size)
                    elif ext in TEXT_EXTS and "caption" not in g:
                        raw = tf.extractfile(m).read()
                        g["caption"] = raw.decode("utf-8", errors="replace").strip()
            except (tarfile.TarError, OSError, EOFError) as e:
                # a truncated shard: keep what was indexed, count the rest as lost
                self.skipped["truncated_shard"] += 1
                print(f"flipkern-pretrain: warning: shard {shard} is truncated or corrupt after "
                      f"{len(groups)} keys ({e}); using the keys before that", file=sys.stderr)
        for key, g in groups.items():
            if "image" not in g:
                self.skipped["missing_image"] += 1
            elif not g.get("caption"):
                self.skipped["empty_caption"] += 1
            else:
                self.samples.append((si, g["image"][0], g["image"][1], g["caption"]))

    def __len__(self):
        return len(self.samples)

    def caption(self, index):
        return self.samples[index][3]

    def _file(self, si):
        pid = os.getpid()
        if self._pid != pid:  # file handles are per process (DataLoader workers fork)
            self._files, self._pid = {}, pid
        f = self._files.get(si)
        if f is None:
            f = self._files[si] = open(self.shards[si], "rb")
        return f

    def __getitem__(self, index):
        si, off, size, cap = self.samples[index]
        f = self._file(si)
        f.seek(off)
        data = f.read(size)
        return _decode_image(io.BytesIO(data), self.image_size, f"{self.shards[si]}@{off}"), cap

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state


def detect_type(path):
    """'csv' or 'webdataset' from a data path."""
    p = str(path).lower()
    if ".tar" in p or "{" in p or "::" in p:
        return "webdataset"
    if p.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise DataError(f"cannot tell the dataset type of {path!r} (expected .csv/.tsv or .tar shards); "
                    f"pass --dataset-type")
