"""Decode benchmark: greedy tokens/s of Model.generate vs transformers' generate on the same random weights.

    python tests/bench_decode.py [CONFIG] [--key=value ...]     # default config/tiny.py; run from the repo root

transformers is only a peer and an oracle, so this script sits with the tests (pytest does not collect it;
tests/test_model.py calls bench_decode at a tiny size and checks the tokens are identical).
"""
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from config import load, pick  # noqa: E402
from model import Model, ModelConfig  # noqa: E402


def bench_decode(cfg, prompt_len=16, new_tokens=128, batches=(1, 8)):
    """Greedy decoding tokens/s of Model.generate and of transformers' generate on the same random weights,
    side by side; their tokens are compared. transformers is the peer: it lives
    beside the tests, never in project code."""
    import tempfile
    import time
    import transformers
    torch.manual_seed(0)
    ours = Model(replace(cfg, bos_id=None, eos_id=None, pad_id=None)).eval()  # no stop id: full length
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    print(f"decode: {ours.num_params():,} parameters, fp32, {torch.get_num_threads()} threads, greedy, "
          f"{prompt_len}-token prompts, {new_tokens} new tokens")
    for b in batches:
        prompts = torch.randint(cfg.vocab_size, (b, prompt_len))
        t0 = time.perf_counter()
        mine = ours.generate(prompts.tolist(), new_tokens)
        t1 = time.perf_counter()
        with torch.no_grad():
            peer = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt_len:]
        t2 = time.perf_counter()
        same = torch.equal(torch.tensor(mine), peer)
        print(f"batch {b}: ours {b * new_tokens / (t1 - t0):,.0f} tokens/s, transformers "
              f"{b * new_tokens / (t2 - t1):,.0f} tokens/s, ratio {(t2 - t1) / (t1 - t0):.2f}x; "
              f"tokens {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    ns = load(sys.argv[1:] or ["config/tiny.py"], ModelConfig, prog="python tests/bench_decode.py", strict=False)
    bench_decode(ModelConfig(**pick(ns, ModelConfig)))
