"""posttrain.py: the post-training loaders (packing, masks, positions, padding)."""
import json

import numpy as np
import pytest
import torch

import data
import posttrain as pt
from data import Tokenizer


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer.byte_level()


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


# ------------------------------------------------------------------------------------ post-training

def test_best_fit_decreasing_on_a_hand_example():
    # capacity 10, items by size 7 4 4 1: 7 -> new bin0 (room 3); 4 -> new bin1 (room 6); 4 -> bin1 (room 2);
    # 1 -> bin1, the fullest bin it fits (first fit would take bin0)
    assert pt.pack_bfd([7, 4, 1, 4], 10) == [[0], [1, 3, 2]]
    # 7 6 3 3 2 2 1 (ties by index): 7 -> bin0 (3); 6 -> bin1 (4); 3 -> bin0 (0); 3 -> bin1 (1); 2 -> bin2 (8);
    # 2 -> bin2 (6); 1 -> bin1 (0)
    assert pt.pack_bfd([3, 7, 2, 6, 3, 2, 1], 10) == [[1, 0], [3, 4, 6], [2, 5]]
    assert pt.pack_bfd([5, 5, 5], 5) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="item 1 has length 11"):
        pt.pack_bfd([3, 11], 10)


def _conversations():
    return [
        {"messages": [{"role": "system", "content": "/think"}, {"role": "user", "content": "Compute 2 + 3."},
                      {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n</think>\nThe answer is 5."}]},
        {"messages": [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi <|im_end|>"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"},
                      {"role": "assistant", "content": "No."}]},
        {"messages": [{"role": "user", "content": "Compute 9 / 3."},
                      {"role": "assistant", "content": "<think>\n9 / 3 = 3.\n</think>\nThe answer is 3."}]},
        {"messages": [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "x"},
                      {"role": "assistant", "content": "y"}]},
    ]


def test_sft_packing_positions_and_masks(tmp_path, byte_tok):
    convs = _conversations()
    path = _write_jsonl(tmp_path / "sft.jsonl", convs)
    full = [data.render_chat(byte_tok, c["messages"])[0] for c in convs]
    T = 1640  # byte-level lengths 1347, 283, 1347, 232: two rows of two conversations
    sft = pt.SFTLoader(path, byte_tok, T, micro_batch_size=2)
    assert sft.bins == pt.pack_bfd([len(ids) - 1 for ids in full], T)
    for r, items in enumerate(sft.bins):
        at = 0
        for i in items:
            n = len(full[i]) - 1
            seg = slice(at, at + n)
            assert sft.x[r, seg].tolist() == full[i][:-1]  # the whole conversation, in its own segment
            assert sft.pos[r, seg].tolist() == list(range(n))  # positions restart: no cross-document leakage
            y = sft.y[r, seg]
            keep = y != -100
            assert (y[keep] == np.array(full[i][1:])[keep]).all()  # next-token targets within the conversation
            targets = byte_tok.decode(y[keep].tolist())
            answers = [m["content"] + "<|im_end|>" for m in convs[i]["messages"] if m["role"] == "assistant"]
            assert targets == "".join(answers), targets  # exactly the assistant turns and their <|im_end|>
            at += n
        assert (sft.y[r, at:] == -100).all() and (sft.x[r, at:] == byte_tok.pad_id).all()
        assert (sft.pos[r, at:] == -1).all()  # padding: pos -1, which nothing attends to or from
    assert any(len(items) > 1 for items in sft.bins)
    x, y, pos = sft.get(0, 0)
    r0, r1 = sft.indices(0, 0).tolist()
    assert x.shape == (2, T) and torch.equal(x[1], torch.from_numpy(sft.x[r1]))
    assert torch.equal(pos[0], torch.from_numpy(sft.pos[r0]))
    one = pt.SFTLoader(path, byte_tok, T, micro_batch_size=1)
    assert sorted(one.indices(s, 0)[0] for s in range(len(one.bins))) == list(range(len(one.bins)))  # an epoch


def test_preference_and_prompt_batches(tmp_path, byte_tok):
    rows = [{"prompt": [{"role": "user", "content": f"Compute {a} + 1."}],
             "chosen": [{"role": "assistant", "content": f"The answer is {a + 1}."}],
             "rejected": [{"role": "assistant", "content": f"The answer is {a + 2}!!"}]} for a in range(6)]
    pref = pt.PreferenceLoader(_write_jsonl(tmp_path / "p.jsonl", rows), byte_tok, 2048, micro_batch_size=3)
    (xc, yc, pc), (xr, yr, pr) = pref.get(0, 0)
    assert xc.shape == xr.shape
    for i, k in enumerate(pref.indices(0, 0).tolist()):
        for x, y, reply in ((xc, yc, f"The answer is {k + 1}."), (xr, yr, f"The answer is {k + 2}!!")):
            assert byte_tok.decode(y[i][y[i] != -100].tolist()) == reply + "<|im_end|>"
            ids = data.render_chat(byte_tok, rows[k]["prompt"] + [{"role": "assistant", "content": reply}])[0]
            assert x[i, :len(ids) - 1].tolist() == ids[:-1]
            assert (x[i, len(ids) - 1:] == byte_tok.pad_id).all()
            pos = (pc if x is xc else pr)[i]
            assert pos.tolist() == list(range(len(ids) - 1)) + [-1] * (x.shape[1] - len(ids) + 1)
    # a multi-turn prompt: its own assistant turn is context, so only the final reply is the completion
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    multi = [{**r, "prompt": history + r["prompt"]} for r in rows[:1]]
    multi_loader = pt.PreferenceLoader(_write_jsonl(tmp_path / "m.jsonl", multi), byte_tok, 2048, 1)
    (_, yc, _), (_, yr, _) = multi_loader.get(0, 0)
    assert byte_tok.decode(yc[0][yc[0] != -100].tolist()) == "The answer is 1.<|im_end|>"
    assert byte_tok.decode(yr[0][yr[0] != -100].tolist()) == "The answer is 2!!<|im_end|>"
    rl = [{"prompt": [{"role": "user", "content": f"Compute {a} * 2."}], "answer": str(2 * a)} for a in range(5)]
    prompts = pt.PromptLoader(_write_jsonl(tmp_path / "rl.jsonl", rl), byte_tok, micro_batch_size=2,
                                enable_thinking=False)
    ids, answers = prompts.get(1, 0)
    for p, ans in zip(ids, answers):
        k = int(ans) // 2
        assert p == data.render_chat(byte_tok, rl[k]["prompt"], add_generation_prompt=True, enable_thinking=False)[0]
    with pytest.raises(ValueError, match=r"rl2.jsonl:1: expected field 'answer' of type str"):
        pt.PromptLoader(_write_jsonl(tmp_path / "rl2.jsonl", [{"prompt": [], "answer": 3}]), byte_tok, 1)
    with pytest.raises(ValueError, match="file not found: .*nope.jsonl"):
        pt.SFTLoader(str(tmp_path / "nope.jsonl"), byte_tok, 64, 1)


