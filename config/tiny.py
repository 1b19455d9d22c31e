"""Tiny CPU config: the whole SmolLM3 recipe at toy scale, trains in minutes on 2 cores."""
# ---- model: 3,950,848 parameters; SmolLM3's shape in miniature (GQA, RNoPE, tied, doc masking) ----
vocab_size = 4096            # BPE trained on the embedded default corpus
d_model = 256
n_layers = 4
n_heads = 4                  # head_dim 64
n_kv_heads = 2
d_ff = 688                   # ~2.7x d_model (SmolLM3: 11008 / 2048 = 5.4x; smaller here to save CPU time)
rope_theta = 10000.0
nope_interval = 4            # layer 3 is NoPE
max_position_embeddings = 2048
tie_embeddings = True
doc_masking = True
attn_impl = "sdpa"
