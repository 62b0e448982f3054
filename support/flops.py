"""
Model FLOPs per trained token, for the MFU that train.py logs and the benchmarks report.
"""


def flops_per_token(a, n_params, seq_len, stage):
    """Model FLOPs per trained token (PaLM, App. B): 6N for the weights' forward and backward plus
    12 * layers * D * L for attention. Diffusion steps self-condition half the time with one more
    forward pass (a third of forward + backward). Recomputation under --grad-ckpt is not counted."""
    flops = 6 * n_params + 12 * a.num_hidden_layers * a.hidden_size * seq_len
    return flops * (1 + 0.5 / 3) if stage in ("adapt", "sft") else flops
