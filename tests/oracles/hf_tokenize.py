"""HF `tokenizers` (the Rust library transformers uses) as the reference for afm's tokenizer.

    hf_tokenize.py encode TOKENIZER_JSON TEXTS_JSON OUT_JSON
        TEXTS_JSON holds a list of strings. OUT_JSON gets one object per string:
        {"ids": ..., "ids_special": ..., "decoded": ..., "decoded_skip": ...}: the ids without and
        with add_special_tokens, and the text of "ids" decoded with skip_special_tokens False and
        True.

    hf_tokenize.py bench TOKENIZER_JSON CORPUS_TXT
        Encodes the corpus paragraph by paragraph (split on blank lines, as bench/bench_tokenizer.cpp
        does) on one thread, starting from an empty word cache, and prints
        "tokens=N seconds=S tokenizers=VERSION".

TOKENIZER_JSON may be gzipped (a name ending in .gz).
"""
import gzip
import json
import os
import sys
import time

import tokenizers
from tokenizers import Tokenizer


def load(tokenizer_json):
    if tokenizer_json.endswith(".gz"):
        with gzip.open(tokenizer_json, "rt", encoding="utf-8") as f:
            return Tokenizer.from_str(f.read())
    return Tokenizer.from_file(tokenizer_json)


def encode(tokenizer_json, texts_json, out_json):
    tok = load(tokenizer_json)
    with open(texts_json, encoding="utf-8") as f:
        texts = json.load(f)
    plain = tok.encode_batch(texts, add_special_tokens=False)
    # encode() is the pipeline and then post_process(); running only the second half again for
    # add_special_tokens=True halves the time of the corpora.
    special = [tok.post_process(e, add_special_tokens=True) for e in plain]
    ids = [e.ids for e in plain]
    decoded = tok.decode_batch(ids, skip_special_tokens=False)
    decoded_skip = tok.decode_batch(ids, skip_special_tokens=True)
    out = [
        {"ids": i, "ids_special": s.ids, "decoded": d, "decoded_skip": k}
        for i, s, d, k in zip(ids, special, decoded, decoded_skip)
    ]
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))


def bench(tokenizer_json, corpus_txt):
    # One thread, as afm's bench: encode_batch reads this when it runs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load(tokenizer_json)
    # newline="" keeps "\r\n" as it is in the file, so both sides see the same bytes.
    with open(corpus_txt, encoding="utf-8", newline="") as f:
        paragraphs = f.read().split("\n\n")
    start = time.perf_counter()
    encodings = tok.encode_batch(paragraphs, add_special_tokens=False)
    seconds = time.perf_counter() - start
    print(f"tokens={sum(len(e.ids) for e in encodings)} seconds={seconds:.4f} tokenizers={tokenizers.__version__}")


if __name__ == "__main__":
    commands = {"encode": (encode, 3), "bench": (bench, 2)}
    if len(sys.argv) < 2 or sys.argv[1] not in commands or len(sys.argv) != 2 + commands[sys.argv[1]][1]:
        sys.exit(__doc__)
    commands[sys.argv[1]][0](*sys.argv[2:])
