#!/usr/bin/env python3
"""Makes calibration inputs for the MiniLM-L6 sentence encoder from plain English text files.

Tokenizes with the model's own WordPiece vocabulary (BERT basic tokenizer: lower-case, strip
accents, split on whitespace and punctuation; greedy longest-match word pieces), writes
input_ids / attention_mask / token_type_ids .npy files ([samples, seq], int64). No dependencies
beyond the standard library, so it runs on CI images without numpy.

usage: minilm-calibration.py [--pack] TOKENIZER_JSON OUT_PREFIX SEQ SAMPLES TEXT_FILE...

One sentence per sample, padded; with --pack, consecutive sentences fill each sample to SEQ
tokens, so calibration statistics come from real tokens rather than padding.
"""
import json, re, sys, unicodedata

def npy_write(path, rows, seq):
    header = "{'descr': '<i8', 'fortran_order': False, 'shape': (%d, %d), }" % (len(rows), seq)
    header = header.encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
        for r in rows:
            f.write(b"".join(v.to_bytes(8, "little", signed=True) for v in r))

def basic_tokens(text):
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    out = []
    for word in text.split():
        out += [t for t in re.split(r"([^\w])", word) if t and not t.isspace()]
    return out

def wordpiece(word, vocab, unk):
    pieces, start = [], 0
    while start < len(word):
        end, cur = len(word), None
        while start < end:
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                cur = sub
                break
            end -= 1
        if cur is None:
            return [unk]
        pieces.append(cur)
        start = end
    return pieces

def main():
    args = sys.argv[1:]
    pack = "--pack" in args
    args = [a for a in args if a != "--pack"]
    tok, prefix, seq, samples = args[0], args[1], int(args[2]), int(args[3])
    vocab = json.load(open(tok))["model"]["vocab"]
    cls, sep, pad, unk = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"], "[UNK]"
    # Lines holding only "%" separate entries (fortune files): treat them as sentence ends.
    text = " ".join(re.sub(r"(?m)^%$", ".", open(p, errors="ignore").read()) for p in args[4:])
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]
    ids_rows, mask_rows = [], []
    pieces = [[vocab[p] for w in basic_tokens(s) for p in wordpiece(w, vocab, unk)] for s in sentences]
    if pack:
        flat = [t for p in pieces for t in p]
        pieces = [flat[i:i + seq - 2] for i in range(0, len(flat) - (seq - 2) + 1, seq - 2)]
    for p in pieces[:samples]:
        ids = [cls] + p[: seq - 2] + [sep]
        mask = [1] * len(ids) + [0] * (seq - len(ids))
        ids_rows.append(ids + [pad] * (seq - len(ids)))
        mask_rows.append(mask)
    npy_write(prefix + "input_ids.npy", ids_rows, seq)
    npy_write(prefix + "attention_mask.npy", mask_rows, seq)
    npy_write(prefix + "token_type_ids.npy", [[0] * seq for _ in ids_rows], seq)
    print(f"{len(ids_rows)} sentences of {seq} tokens -> {prefix}*.npy")

main()
