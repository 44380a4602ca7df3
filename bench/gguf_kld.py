"""Quick KLD/top-1/ΔPPL of GGUF files against the fp32 reference model (not a test, not eval-parity): llama.cpp's
logits (llama-cpp-python, 2 threads) over ctx-512 chunks of the first N tokens of TEXT, the second half of each
chunk scored, the reference's log-probs cached in /tmp/w. Used for issue 21's SmolLM2 figures where a full
eval-parity run of every row did not fit the session. BENCH_THREADS sets the threads (default 2).

    python bench/gguf_kld.py CKPT TEXT N_TOKENS FILE.gguf [FILE.gguf ...]
"""
import hashlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from runtimes import RUNTIMES
from toolkit.checkpoints import load_checkpoint
from toolkit.core.model import build_model

ckpt, text, ntok = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sys.argv[4:]
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
b = load_checkpoint(ckpt)
ids = b.tokenizer.encode(open(text).read()[:ntok*8], add_bos=False)[:ntok]
ctx = 512
chunks = [ids[i:i+ctx] for i in range(0, len(ids)-ctx+1, ctx)]
os.makedirs("/tmp/w", exist_ok=True); cache = f"/tmp/w/ref-{hashlib.md5((ckpt+text+str(ntok)).encode()).hexdigest()}.npy"
def lsm(x): x = x - x.max(-1, keepdims=True); return x - np.log(np.exp(x).sum(-1, keepdims=True))
if os.path.exists(cache): ref = np.load(cache)
else:
    m = build_model(b); torch.set_num_threads(THREADS)
    with torch.no_grad(): ref = np.stack([lsm(m(torch.tensor([c]))[0].numpy()[ctx//2:]) for c in chunks])
    np.save(cache, ref)
for f in files:
    rt = RUNTIMES["llama_cpp"].load(f, threads=THREADS, ctx=ctx)
    kl, top, nll = [], [], []
    for k, c in enumerate(chunks):
        got = lsm(np.asarray(rt.logits(c), np.float64)[ctx//2:])
        r = ref[k]
        kl.append((np.exp(r) * (r - got)).sum(-1)); top.append(r.argmax(-1) == got.argmax(-1))
        tg = np.array(c[ctx//2+1:] + [0])[:-1]
        nll.append(-got[np.arange(len(tg)), tg])
    rn = -np.concatenate([ref[k][np.arange(ctx//2-1), np.array(c[ctx//2+1:])] for k, c in enumerate(chunks)])
    print(f"{os.path.basename(f):28s} KLD {np.concatenate(kl).mean():.5f} top1 {np.concatenate(top).mean():.4f} dPPL {100*(np.exp(np.concatenate(nll).mean()-rn.mean())-1):+.2f}% size {os.path.getsize(f)/1e6:.1f}MB", flush=True)
    del rt
