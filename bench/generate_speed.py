"""Generation speed of zaizai's GPT, side by side with Hugging Face transformers on the same weights.

    .venv/bin/python bench/generate_speed.py                  # both sizes, torch's default thread count
    .venv/bin/python bench/generate_speed.py --threads 1      # one core
    .venv/bin/python bench/generate_speed.py --dtype bfloat16 # both models' weights in bf16
    .venv/bin/python bench/generate_speed.py --corpus ../shared/corpora/tang.txt.xz  # the README's figures

For a 4-layer/128-wide (4 heads) and a 6-layer/384-wide (6 heads) GPT with random weights, block_size 1024,
and the ``--corpus`` vocabulary (its distinct characters + 6 special tokens): 9,706 for the 4.5M-character
Tang-poetry corpus the README's figures came from; without --corpus, the built-in demo corpus's
(chatterbot-corpus Chinese + 崽崽's introduction; see ``bench/corpus.py``). Greedy generation of ``--new-tokens`` tokens (500) at batch 1 after a
``--prompt-tokens`` (200) token history, a char tokenizer's 200 characters.

- zaizai: :func:`zaizai.inference.generate.generate_ids` (KV cache, temperature 0).
- transformers: ``GPT2LMHeadModel.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`` with its
  own KV cache, SDPA attention, on a copy of the same weights (the four Conv1D weights transposed).

tokens/s counts the new tokens over the whole call, prompt processing included; time to first token (TTFT)
is the time from the call to the first new token (transformers: ``max_new_tokens=1``). Both run under
``torch.inference_mode()`` in interleaved rounds (order alternating, one warm-up call each), and the median
round is reported. The last column says whether both produced the same greedy tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig
from zaizai.models import ModelConfig, build_model

from corpus import N_SPECIAL_TOKENS, add_corpus_argument, load_corpus

SIZES = [(4, 4, 128), (6, 6, 384)]  # (n_layer, n_head, n_embd)


def models(vocab: int, n_layer: int, n_head: int, n_embd: int, block_size: int, dtype: torch.dtype):
    """A random zaizai GPT and a transformers GPT2LMHeadModel holding the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ModelConfig(model="gpt", vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, dropout=0.0, bias=True)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    hf_cfg = GPT2Config(vocab_size=vocab, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = ours.state_dict()
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old transformers versions keep the causal mask as a buffer
            p.copy_(state[name].t() if name.endswith(conv1d) else state[name])
    return ours.to(dtype), hf.to(dtype)


def run_zaizai(model, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds for all n, the tokens)."""
    cfg = SamplingConfig(max_new_tokens=n, temperature=0)
    t0 = time.perf_counter()
    stream = generate_ids(model, prompt, cfg)
    tokens = [next(stream)]
    ttft = time.perf_counter() - t0
    tokens += stream
    return ttft, time.perf_counter() - t0, tokens


def run_hf(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    idx = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
    return time.perf_counter() - t0, out[0, len(prompt):].tolist()


def measure(vocab: int, size: tuple[int, int, int], args, dtype: torch.dtype) -> dict:
    ours, hf = models(vocab, *size, args.block_size, dtype)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(N_SPECIAL_TOKENS, vocab, (args.prompt_tokens,), generator=g).tolist()
    run_zaizai(ours, prompt, 20)  # warm-up: first calls allocate and pick kernels
    run_hf(hf, prompt, 20)
    ours_total, ours_ttft, hf_total, hf_ttft = [], [], [], []
    same = True
    for r in range(args.rounds):
        for who in ("zaizai", "hf") if r % 2 == 0 else ("hf", "zaizai"):
            if who == "zaizai":
                ttft, total, tokens = run_zaizai(ours, prompt, args.new_tokens)
                ours_ttft.append(ttft)
                ours_total.append(total)
                ours_tokens = tokens
            else:
                total, hf_tokens = run_hf(hf, prompt, args.new_tokens)
                hf_total.append(total)
                hf_ttft.append(run_hf(hf, prompt, 1)[0])
        same = same and ours_tokens == hf_tokens
    n = args.new_tokens
    return dict(
        ours_tps=n / statistics.median(ours_total), hf_tps=n / statistics.median(hf_total),
        ours_ttft=statistics.median(ours_ttft), hf_ttft=statistics.median(hf_ttft), same=same,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--sizes", default="all", choices=("all", "small", "large"))
    add_corpus_argument(ap)
    args = ap.parse_args()
    if args.prompt_tokens + args.new_tokens > args.block_size:
        ap.error("--prompt-tokens + --new-tokens must fit in --block-size")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    corpus = load_corpus(args.corpus)
    vocab, source = corpus.vocab_size, corpus.name
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    sizes = {"all": SIZES, "small": SIZES[:1], "large": SIZES[1:]}[args.sizes]
    print(corpus.header())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.dtype}; vocab {vocab} ({source}), block {args.block_size}; batch 1, greedy, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; median of {args.rounds} rounds")
    print(f"{'model':<12} {'zaizai tok/s':>12} {'transformers tok/s':>18} {'ratio':>6} "
          f"{'zaizai TTFT':>11} {'transformers TTFT':>17} {'same tokens':>11}")
    for size in sizes:
        m = measure(vocab, size, args, dtype)
        name = f"{size[0]}L/{size[2]}d"
        print(f"{name:<12} {m['ours_tps']:>12,.0f} {m['hf_tps']:>18,.0f} {m['ours_tps'] / m['hf_tps']:>5.2f}x "
              f"{m['ours_ttft'] * 1e3:>8.1f} ms {m['hf_ttft'] * 1e3:>14.1f} ms {'yes' if m['same'] else 'no':>11}",
              flush=True)


if __name__ == "__main__":
    main()
