"""Decode benchmark: greedy tokens/s of Model.generate vs transformers' generate on the same random weights.

    python tests/bench_decode.py [CONFIG] [--key=value ...]  # default config/tiny.py; run from the repo root
    python tests/bench_decode.py --compile=True --threads=1   # + generate(compile=True) and its compile time

Both run in one process, alternating, each after one warm-up call (first-call costs left out); the median of
`repeats` calls is reported with the load average beside it, and the greedy tokens of every peer are compared.
transformers is only a peer and an oracle, so this script sits with the tests (pytest does not collect it;
tests/test_model.py calls bench_decode at a tiny size and checks the tokens are identical).
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from config import load, pick  # noqa: E402
from model import Model, ModelConfig  # noqa: E402


@dataclass
class BenchConfig:
    prompt_len: int = 16
    new_tokens: int = 128
    repeats: int = 3
    compile: bool = False     # also time generate(compile=True), its first call (the compile) apart
    threads: int = 0          # torch's intra-op threads for both peers; 0 = torch's default


def bench_decode(cfg, prompt_len=16, new_tokens=128, batches=(1, 8), repeats=3, compile=False):
    """Greedy decoding tokens/s of Model.generate (and of generate(compile=True)) and of transformers'
    generate on the same random weights, side by side; their tokens are compared. transformers is the peer:
    it lives beside the tests, never in project code."""
    import tempfile
    import transformers
    torch.manual_seed(0)
    ours = Model(replace(cfg, bos_id=None, eos_id=None, pad_id=None)).eval()  # no stop id: full length
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    print(f"decode: {ours.num_params():,} parameters, fp32, {torch.get_num_threads()} threads, greedy, "
          f"{prompt_len}-token prompts, {new_tokens} new tokens, median of {repeats}")
    for b in batches:
        prompts = torch.randint(cfg.vocab_size, (b, prompt_len))

        def peer():
            with torch.no_grad():
                return theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt_len:].tolist()
        runs = {"ours": lambda: ours.generate(prompts.tolist(), new_tokens), "transformers": peer}
        if compile:
            runs["compiled"] = lambda: ours.generate(prompts.tolist(), new_tokens, compile=True)
        first, tokens, times = {}, {}, {k: [] for k in runs}
        for k, run in runs.items():
            t0 = time.perf_counter()
            tokens[k] = run()
            first[k] = time.perf_counter() - t0
        for _ in range(repeats):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
        sec = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: b * new_tokens / s for k, s in sec.items()}
        line = (f"batch {b}: ours {rate['ours']:,.0f} tokens/s, transformers {rate['transformers']:,.0f} tokens/s, "
                f"ratio {sec['transformers'] / sec['ours']:.2f}x")
        if compile:
            # compiling pays off once the per-step saving has repaid the first call's extra seconds
            saved = (sec["ours"] - sec["compiled"]) / new_tokens
            extra = first["compiled"] - sec["compiled"]
            pays = f"pays off after {extra / saved:,.0f} steps" if saved > 0 else "never pays off"
            line += (f"; compiled {rate['compiled']:,.0f} tokens/s, "
                     f"ratio {sec['transformers'] / sec['compiled']:.2f}x, first call {first['compiled']:.1f} s ({pays})")
        same = all(t == tokens["transformers"] for t in tokens.values())
        print(f"{line}; load {os.getloadavg()[0]:.1f}; tokens {'identical' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if all(a.startswith("-") for a in argv):  # no config file named: tiny's shape
        argv = ["config/tiny.py"] + argv
    ns = load(argv, ModelConfig, BenchConfig, prog="python tests/bench_decode.py", strict=False)
    bc = BenchConfig(**pick(ns, BenchConfig))
    if bc.threads:
        torch.set_num_threads(bc.threads)
    bench_decode(ModelConfig(**pick(ns, ModelConfig)), bc.prompt_len, bc.new_tokens, repeats=bc.repeats,
                 compile=bc.compile)
