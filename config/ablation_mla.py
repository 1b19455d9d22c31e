"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: multi-head latent attention (DeepSeek-V2)."""
base = "smollm3_1b_ablation.py"
# 1,234,771,968 parameters, matched to the baseline's 1,235,814,400 (-0.08%) through the latent width: per layer
# q 2048 x 32 x 64 + kv_down 2048 x (384 + 32) + kv_up 384 x 32 x 96 + o 2048^2 = 10,420,608 vs GQA's 10,485,760.
# KV cache 16 x (384 + 32) x 2 = 13,312 bytes/token in bf16 vs GQA's 32,768 (2.46x smaller).
attention = "mla"
attn_impl = "sdpa"           # kernels.py's Triton kernel is written for GQA's cache-free shapes; SDPA's
                             # fused kernels run MLA on the GPU (K/V expanded per head, so one mask fits all)
kv_lora_rank = 384
q_lora_rank = 0              # DeepSeek-V2-Lite's choice at this width: queries straight from the residual stream
qk_nope_head_dim = 32        # + 32 rope dims = the baseline's 64 score dims per head
qk_rope_head_dim = 32
v_head_dim = 64
out_dir = "out/ablation_mla"
