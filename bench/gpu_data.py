"""
The data folder the device check's train.py smoke reads: a "tokens" dataset (data/shards.py) of
random documents over the shipped miniature's tokenizer, so that `train.py --stage adapt --init
models/tess2-shakespeare` accepts it. About 30 KB; made in a second, deterministic.

    python bench/gpu_data.py out/gpu-data    # made here and carried to the device (out/ is ignored by git)

bench/gpu.sh uses out/gpu-data when it is there, and otherwise runs this into its own temporary folder.
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.shards import write_tokens  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402

SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")


def make(folder, documents=96, seed=0):
    """Writes `documents` documents of BOS + 40-300 random ordinary tokens + EOS to folder."""
    tok = Tokenizer(SHIPPED)
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[tok.bos_id], rng.integers(3, tok.pad_id, rng.integers(40, 300)), [tok.eos_id]])
            for _ in range(documents)]
    return write_tokens(folder, docs, dict(tok.meta(), source="bench/gpu_data.py: random tokens"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu_data.py FOLDER")
    meta = make(sys.argv[1])
    print(f"{sys.argv[1]}: {meta['num_tokens']} tokens")
