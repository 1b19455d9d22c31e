"""Data benchmark: prepare and Loader throughput, the loader's memory over many steps, train_bpe's time.

    python tests/bench_data.py          # run from the repo root (~30 s)

prepare and Loader run on three synthetic sources with the SmolLM3 3-stage curriculum; the memory is the
anonymous memory (Linux RssAnon: what would grow if the loader kept state per step) over 10,000 steps; train_bpe
trains on the first ~10 MB of this interpreter's standard library (the default corpus' code), beside its peer,
HF tokenizers' BpeTrainer on the same text (skipped where `tokenizers` is not installed). Results: BENCHMARKS.md.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import (LLAMA3_PATTERN, DataConfig, Loader, Tokenizer, iter_documents, prepare,  # noqa: E402
                  stdlib_files, train_bpe)


def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon"))


def main():
    seq_len, micro_batch_size, mb_per_source, n_batches, total_steps = 2048, 8, 16, 3000, 1_000_000
    with tempfile.TemporaryDirectory() as d:
        tok, rng, t0 = Tokenizer.byte_level(), np.random.default_rng(0), time.perf_counter()
        for source in ("web", "code", "math"):
            letters = rng.integers(97, 123, size=mb_per_source << 20, dtype=np.uint8)
            letters[rng.random(len(letters)) < 0.15] = 32
            text, cuts = letters.tobytes().decode(), np.cumsum(rng.geometric(1 / 3000, size=len(letters) // 1000))
            cuts = [0, *cuts[cuts < len(text)].tolist(), len(text)]
            with open(os.path.join(d, f"{source}.jsonl"), "w") as f:
                f.writelines(json.dumps({"text": text[a:b]}) + "\n" for a, b in zip(cuts, cuts[1:]) if b > a)
            prepare([os.path.join(d, f"{source}.jsonl")], d, tok, source)
        print(f"prepare: 3 x {mb_per_source} MB of synthetic text in {time.perf_counter() - t0:.1f} s")
        third = total_steps // 3
        cfg = DataConfig(data_dir=d, seq_len=seq_len, mixture={"web": 0.85, "code": 0.12, "math": 0.03},
                         stages=[[third, {"web": 0.75, "code": 0.15, "math": 0.10}],
                                 [2 * third, {"web": 0.63, "code": 0.24, "math": 0.13}]])
        loader = Loader(cfg, tok, micro_batch_size, accum=1, seed=0)
        steps = np.random.default_rng(1).integers(0, total_steps, size=n_batches).tolist()
        for step in steps[:100]:  # warm the page cache
            loader.get(step, 0)
        t0 = time.perf_counter()
        for step in steps:
            loader.get(step, 0)
        dt = time.perf_counter() - t0
        print(f"loader: {n_batches * micro_batch_size * seq_len / dt / 1e6:.1f}M tokens/s ({dt / n_batches * 1e6:.0f} "
              f"us per {micro_batch_size}x{seq_len} micro-batch, random steps in [0, {total_steps:,}))")
        before, t0 = rss_anon(), time.perf_counter()
        for step in range(0, total_steps, 100):
            loader.locate(step, 0)
        print(f"indices of {total_steps // 100:,} steps spread over {total_steps:,} in "
              f"{time.perf_counter() - t0:.1f} s: RssAnon {before:.1f} -> {rss_anon():.1f} MiB")
    texts, size = [], 0
    for path in stdlib_files()[0]:
        if size >= 10 << 20:
            break
        texts += iter_documents(path)
        size += len(texts[-1].encode("utf-8"))
    t0 = time.perf_counter()
    tok = train_bpe(texts, 16384)
    dt, n = time.perf_counter() - t0, sum(map(len, tok.encode_batch(texts)))
    print(f"train_bpe: 16384 vocab on {size / 1e6:.1f} MB ({len(texts)} files) in {dt:.1f} s; "
          f"{size / n:.2f} bytes/token; load average {os.getloadavg()[0]:.1f}")
    try:  # the peer: HF tokenizers' BpeTrainer (Rust) on the same text, pre-tokenizer and vocabulary size
        import tokenizers
    except ImportError:
        return
    pre = tokenizers.pre_tokenizers
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre.Sequence([pre.Split(tokenizers.Regex(LLAMA3_PATTERN), "isolated"),
                                     pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    t0 = time.perf_counter()
    hf.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=16384, initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False))
    peer = time.perf_counter() - t0
    n = sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))
    print(f"BpeTrainer peer: {peer:.1f} s; {size / n:.2f} bytes/token; train_bpe / peer = {dt / peer:.2f}; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    if sys.argv[1:]:
        raise SystemExit("usage: python tests/bench_data.py")
    main()
