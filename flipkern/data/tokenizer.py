"""Tokenizers: a self-contained byte-level one (the default) and the CLIP BPE.

Both produce int64 [B, context_length]: ``[sot, tokens..., eot, pad, ...]`` with
pad 0; a caption that is too long is truncated and still ends with eot, so the
eot is always the last non-pad token (where the text tower pools).

ByteTokenizer: ids 1..256 are the UTF-8 bytes (byte b -> b + 1), 257 is sot, 258
eot, 0 pad: vocab_size 259, no files.

BPETokenizer: the CLIP byte-pair encoding (lowercase, byte-to-unicode table,
greedy lowest-rank merges), reading a local ``bpe_simple_vocab_16e6.txt.gz`` (or
any merges file of that format). Vocabulary as in CLIP: 256 byte symbols, their
``</w>`` forms, the merges, then ``<|startoftext|>`` and ``<|endoftext|>``.
Nothing is downloaded. Without the ``regex`` module, the word-splitting pattern's
``\\p{L}`` / ``\\p{N}`` classes are approximated with ``re``'s Unicode classes.
"""
import functools
import gzip
import html
import os
import re

import torch


def _pad_batch(seqs, context_length, sot, eot, pad=0):
    out = torch.full((len(seqs), context_length), pad, dtype=torch.long)
    for i, ids in enumerate(seqs):
        ids = [sot] + list(ids[: context_length - 2]) + [eot]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class ByteTokenizer:
    name = "byte"
    pad_id = 0
    sot_id = 257
    eot_id = 258
    vocab_size = 259

    def __init__(self, context_length=64):
        if context_length < 2:
            raise ValueError(f"tokenizer: context_length must be >= 2, got {context_length}")
        self.context_length = int(context_length)

    def encode(self, text):
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        data = bytes(i - 1 for i in ids if 1 <= i <= 256)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts, context_length=None):
        if isinstance(texts, str):
            texts = [texts]
        return _pad_batch([self.encode(t) for t in texts], context_length or self.context_length,
                          self.sot_id, self.eot_id, self.pad_id)


# ----------------------------------------------------------------------------- CLIP BPE

@functools.lru_cache()
def bytes_to_unicode():
    """The CLIP/GPT-2 reversible map from the 256 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def get_pairs(word):
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


def basic_clean(text):
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text):
    return re.sub(r"\s+", " ", text).strip()


# CLIP: r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_PAT = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                  re.IGNORECASE)


class BPETokenizer:
    name = "bpe"
    pad_id = 0

    def __init__(self, bpe_path, context_length=77):
        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"BPE vocabulary file not found: {bpe_path}")
        self.context_length = int(context_length)
        opener = gzip.open if bpe_path.endswith(".gz") else open
        with opener(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"BPE vocabulary {bpe_path}: malformed merge line {' '.join(bad[0])!r}")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        vocab.extend(["<|startoftext|>", "<|endoftext|>"])
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.sot_id = self.encoder["<|startoftext|>"]
        self.eot_id = self.encoder["<|endoftext|>"]
        self.vocab_size = len(self.encoder)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text):
        ids = []
        text = whitespace_clean(basic_clean(text)).lower()
        for token in _PAT.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        # a padded row: [sot, ..., eot, 0, ...]; id 0 is also the byte "!", so cut at eot
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        text = "".join(self.decoder[i] for i in ids if i != self.sot_id)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts, context_length=None):
        if isinstance(texts, str):
            texts = [texts]
        return _pad_batch([self.encode(t) for t in texts], context_length or self.context_length,
                          self.sot_id, self.eot_id, self.pad_id)


def build_tokenizer(bpe_vocab=None, context_length=64):
    """The byte tokenizer, or the CLIP BPE when a vocabulary file is given."""
    if bpe_vocab:
        return BPETokenizer(bpe_vocab, context_length)
    return ByteTokenizer(context_length)
