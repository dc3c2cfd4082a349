"""Generation speed of zaizai's GPT next to Hugging Face transformers and llama.cpp on the same weights.

    .venv/bin/python bench/generate_speed.py                  # both sizes, torch's default thread count
    .venv/bin/python bench/generate_speed.py --threads 1      # one core
    .venv/bin/python bench/generate_speed.py --sizes small --rounds 5 --new-tokens 200   # a short run
    .venv/bin/python bench/generate_speed.py --corpus ../shared/corpora/tang.txt.xz  # the README's figures

For a 4-layer/128-wide (4 heads) and a 6-layer/384-wide (6 heads) GPT with random weights, block_size 1024,
and the ``--corpus`` vocabulary (its distinct characters + 6 special tokens): 9,706 for the 4.5M-character
Tang-poetry corpus the README's figures came from; without --corpus, the built-in demo corpus's
(chatterbot-corpus Chinese + 崽崽's introduction; see ``bench/corpus.py``).

Batch 1: greedy generation of ``--new-tokens`` (500) tokens after a ``--prompt-tokens`` (200) token history.

- zaizai: :func:`zaizai.inference.generate.generate_ids` (its decode step over a preallocated KV cache);
  with ``--compile``, a second line: the same with its compiled decode step (``zaizai chat --compile``;
  :mod:`zaizai.models.compiled`), compiled before the rounds; with ``--weights float16``, a third line: that step
  on a copy of the model rounded to float16 (``zaizai chat --compile --weights float16``), the bytes llama.cpp's
  F16 file holds; its "llama" column is the one to read.
- transformers: ``GPT2LMHeadModel.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`` with its
  own KV cache, SDPA attention, on a copy of the same weights (the four Conv1D weights transposed).
- llama.cpp (where llama-cpp-python is installed): the model exported by ``zaizai export --format gguf`` as
  F16, ``Llama.generate(temp=0)`` (see bench/gguf_speed.py); its KV cache is F16 too. It runs in a child process
  of its own (``bench/llama_run.py``), so its threads and torch's do not share a process; ``--llama-in-process``
  runs it in this one.

``--model-kind modern``: the same sizes as zaizai's modern model (Qwen3-style: RMSNorm, RoPE, QK-norm, SwiGLU;
``--kv-heads`` key/value heads, 0 = as many as the heads), every weight random (its zero-initialised output
projections too, or each block would be the identity), next to transformers' ``Qwen3ForCausalLM`` holding the
same state dict and llama.cpp's "qwen3" export.

tokens/s counts the new tokens over the whole call, prompt processing included; time to first token (TTFT)
is the time from the call to the first new token. All run under the same thread count in interleaved rounds
(order alternating, one warm-up call each), and the median round is reported, with the ratios taken round by
round (the machine may be shared: a ratio measured within a round is steadier than either figure). "same" says
whether transformers produced the same greedy tokens (llama.cpp: the share of tokens equal to zaizai's up to
the first difference; F16 weights can flip near-ties of random weights).

Batch N: ``--batch-new-tokens`` (100) greedy tokens for each of N sequences (prompts of different lengths,
``--prompt-tokens`` on average) through :class:`zaizai.inference.batch.Batch`, all joining at once: aggregate
new tokens per second over the whole run, prefills included, and its ratio to batch 1.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zaizai.data.tokenizer import CharTokenizer
from zaizai.inference.batch import Batch
from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig
from zaizai.models import ModelConfig, build_model
from zaizai.models.compiled import round_weights
from zaizai.models.modern import swiglu_hidden
from zaizai.training.checkpoint import BEST, save_checkpoint
from zaizai.training.config import TrainConfig

from corpus import N_SPECIAL_TOKENS, add_corpus_argument, load_corpus
from gguf_speed import model_folder
from llama_run import LlamaRun

SIZES = [(4, 4, 128), (6, 6, 384)]  # (n_layer, n_head, n_embd)


def cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 (what the figures depend on)."""
    name, flags = platform.processor() or "unknown CPU", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return f"{name}{', avx512_bf16' if 'avx512_bf16' in flags else ''}"


def modern_folder(folder: Path, tok: CharTokenizer, n_layer: int, n_head: int, n_embd: int, kv_heads: int):
    """A saved modern model (random weights, none zero) in ``folder``, as gguf_speed.model_folder saves a GPT."""
    cfg = ModelConfig(model="modern", vocab_size=tok.vocab_size, block_size=1024, n_layer=n_layer, n_head=n_head,
                      n_kv_head=kv_heads, n_embd=n_embd, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # zero at initialisation: every block would be the identity
            layer.self_attn.o_proj.weight.normal_(0.0, 0.02)
            layer.mlp.down_proj.weight.normal_(0.0, 0.02)
    folder.mkdir(parents=True)
    tok.save(folder / "tokenizer.json")
    save_checkpoint(folder / BEST, model, model_config=cfg.to_dict(), train_config=TrainConfig().to_dict(),
                    state={"step": 0})
    return model


def hf_modern_copy(ours, dtype: torch.dtype):
    """A transformers Qwen3ForCausalLM holding ``ours``'s weights (the same names: a plain copy)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = ours.config
    hf_cfg = Qwen3Config(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=swiglu_hidden(c),
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
                         head_dim=c.n_embd // c.n_head, max_position_embeddings=c.block_size,
                         rms_norm_eps=getattr(c, "rms_norm_eps", 1e-6), tie_word_embeddings=c.tie_embeddings,
                         rope_theta=c.rope_theta,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = Qwen3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf.to(dtype)


def hf_copy(ours, dtype: torch.dtype):
    """A transformers model holding ``ours``'s weights: GPT2LMHeadModel, or Qwen3ForCausalLM for a modern model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if ours.config.model == "modern":
        return hf_modern_copy(ours, dtype)
    cfg = ours.config
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = ours.state_dict()
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old transformers versions keep the causal mask as a buffer
            p.copy_(state[name].t() if name.endswith(conv1d) else state[name])
    return hf.to(dtype)


def run_zaizai(model, prompt: list[int], n: int, compile: bool = False) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds for all n, the tokens)."""
    t0 = time.perf_counter()
    stream = generate_ids(model, prompt, SamplingConfig(max_new_tokens=n, temperature=0), compile=compile)
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


def run_llama_timed(llm: LlamaRun, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    ttft = llm.generate(prompt, 1)[0]
    total, out = llm.generate(prompt, n)
    return ttft, total, out


def run_batch(model, prompts: list[list[int]], n: int) -> float:
    """Seconds to generate n greedy tokens for every prompt, all in one batch."""
    t0 = time.perf_counter()
    batch = Batch(model, rows=len(prompts))
    for p in prompts:
        batch.add(p, SamplingConfig(max_new_tokens=n, temperature=0))
    while batch:
        batch.step()
    return time.perf_counter() - t0


def agreement(a: list[int], b: list[int]) -> float:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(1, len(a))


def measure(variants: dict, hf, llm, prompt: list[int], args) -> dict:
    """Batch-1 figures: interleaved rounds, medians of each figure and of the round-by-round ratios.
    ``variants``: zaizai's lines, name -> (model, compile)."""
    for model, compile in variants.values():  # warm-up: first calls allocate, pick kernels (and compile)
        run_zaizai(model, prompt, 20, compile=compile)
    run_hf(hf, prompt, 20)
    if llm is not None:
        llm.generate(prompt, 20)
    runs: dict[str, list] = {who: [] for who in [*variants, "hf", "llama"]}
    for r in range(args.rounds):
        order = [*variants, "hf", "llama"]
        for who in order if r % 2 == 0 else order[::-1]:
            if who in variants:
                model, compile = variants[who]
                runs[who].append(run_zaizai(model, prompt, args.new_tokens, compile=compile))
            elif who == "hf":
                total, tokens = run_hf(hf, prompt, args.new_tokens)
                runs[who].append((run_hf(hf, prompt, 1)[0], total, tokens))
            elif llm is not None:
                runs[who].append(run_llama_timed(llm, prompt, args.new_tokens))
    n = args.new_tokens
    m = {}
    for who, rs in runs.items():
        if rs:
            m[who] = dict(tps=n / statistics.median(r[1] for r in rs), ttft=statistics.median(r[0] for r in rs),
                          tokens=rs[-1][2])
    for who in variants:
        m[who]["vs_hf"] = statistics.median(h[1] / z[1] for z, h in zip(runs[who], runs["hf"]))
        if runs["llama"]:
            m[who]["vs_llama"] = statistics.median(ll[1] / z[1] for z, ll in zip(runs[who], runs["llama"]))
    return m


def measure_batches(ours, vocab: int, args) -> dict[int, float]:
    """Aggregate tokens/s at each batch size, rounds interleaved, medians."""
    g = torch.Generator().manual_seed(2)
    prompts = {}
    for b in args.batches:
        lengths = torch.randint(args.prompt_tokens // 2, args.prompt_tokens * 3 // 2 + 1, (b,), generator=g).tolist()
        prompts[b] = [torch.randint(N_SPECIAL_TOKENS, vocab, (n,), generator=g).tolist() for n in lengths]
    run_batch(ours, prompts[args.batches[0]], 5)  # warm-up
    times: dict[int, list[float]] = {b: [] for b in args.batches}
    for r in range(args.rounds):
        for b in args.batches if r % 2 == 0 else args.batches[::-1]:
            times[b].append(run_batch(ours, prompts[b], args.batch_new_tokens))
    return {b: b * args.batch_new_tokens / statistics.median(t) for b, t in times.items()}


def load_llama(folder: Path, tmp: Path, threads: int, in_process: bool = False) -> LlamaRun | None:
    """llama.cpp on the F16 GGUF export of the model folder, or None without llama-cpp-python."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from zaizai.interop.gguf import export_gguf

    path = tmp / f"{folder.name}-f16.gguf"
    export_gguf(folder, path, dtype="f16", verbose=False)
    return LlamaRun(path, threads, n_ctx=1024, in_process=in_process)


def print_size(name: str, m: dict, batch: dict[int, float] | None) -> None:
    h = m["hf"]
    for who in ("zaizai", "compiled", "compiled f16"):
        if who not in m:
            continue
        z = m[who]
        label = name if who == "zaizai" else f"  {who}"
        line = f"{label:<14} {z['tps']:>8,.0f} {h['tps']:>8,.0f} {z['vs_hf']:>6.2f}x  "
        if "llama" in m:
            ll = m["llama"]
            line += f"{ll['tps']:>8,.0f} {z['vs_llama']:>6.2f}x  "
        else:
            line += f"{'-':>8} {'-':>7}  "
        line += f"{z['ttft'] * 1e3:>7.1f} {h['ttft'] * 1e3:>7.1f} "
        line += f"{m['llama']['ttft'] * 1e3:>7.1f}" if "llama" in m else f"{'-':>7}"
        line += f" {'yes' if z['tokens'] == h['tokens'] else 'no':>5}"
        if "llama" in m:
            line += f" {agreement(z['tokens'], m['llama']['tokens']):>5.0%}"
        print(line, flush=True)
    if batch:
        base = batch[min(batch)]
        print("               aggregate tok/s: " + " · ".join(f"batch {b}: {v:,.0f} ({v / base:.1f}x)"
                                                       for b, v in batch.items()), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``; None: sys.argv's), checked, ``batches`` as a list of ints."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--sizes", default="all", choices=("all", "small", "large"))
    ap.add_argument("--batches", default="1,8,32", help="batch sizes for the aggregate figures ('' = none)")
    ap.add_argument("--batch-new-tokens", type=int, default=100)
    ap.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--llama-in-process", action="store_true",
                    help="run llama.cpp in this process, beside torch (default: a child process of its own)")
    ap.add_argument("--model-kind", choices=("gpt", "modern"), default="gpt",
                    help="gpt (GPT-2 block) or modern (Qwen3-style: RMSNorm, RoPE, QK-norm, SwiGLU)")
    ap.add_argument("--compile", action="store_true",
                    help="also zaizai with its compiled decode step (zaizai chat --compile), a line of its own")
    ap.add_argument("--weights", choices=("float32", "float16"), default="float32",
                    help="float16: also zaizai's compiled step on its weights rounded to float16 (zaizai chat --compile "
                         "--weights float16), a line of its own: the bytes llama.cpp's F16 file holds")
    ap.add_argument("--kv-heads", type=int, default=0,
                    help="modern: key/value heads (grouped-query attention); 0 = as many as the heads")
    add_corpus_argument(ap)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.weights == "float16" and args.dtype != "float32":
        ap.error("--weights float16 rounds the float32 model's matrices; leave --dtype at float32")
    if args.prompt_tokens * 3 // 2 + max(args.new_tokens, args.batch_new_tokens) > 1024:
        ap.error("--prompt-tokens x 1.5 + --new-tokens must fit in block_size 1024")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    corpus = load_corpus(args.corpus)
    tok = CharTokenizer.from_text(corpus.text)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    sizes = {"all": SIZES, "small": SIZES[:1], "large": SIZES[1:]}[args.sizes]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(N_SPECIAL_TOKENS, tok.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    print(corpus.header())
    kv = f", {args.kv_heads} kv heads" if args.model_kind == "modern" and args.kv_heads else ""
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}; {args.model_kind}{kv}; block 1024; batch 1 greedy, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; median of {args.rounds} interleaved rounds")
    print(f"{'model':<14} {'tok/s: zaizai':>13} {'HF':>4} {'zaizai/HF':>9}  {'llama.cpp F16':>13} {'z/llama':>7}"
          f"  {'TTFT ms: zaizai':>15} {'HF':>3} {'llama':>7} {'same':>4} {'llama':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        for n_layer, n_head, n_embd in sizes:
            folder = Path(tmp) / f"{n_layer}x{n_embd}"
            if args.model_kind == "modern":
                ours = modern_folder(folder, tok, n_layer, n_head, n_embd, args.kv_heads).eval()
            else:
                ours = model_folder(folder, tok, n_layer, n_head, n_embd, 1024).eval()
            hf = hf_copy(ours, dtype)
            ours = ours.to(dtype)
            llm = (None if args.no_llama or dtype != torch.float32
                   else load_llama(folder, Path(tmp), torch.get_num_threads(), args.llama_in_process))
            variants = {"zaizai": (ours, False)}
            if args.compile:
                variants["compiled"] = (ours, True)
            if args.weights == "float16":
                variants["compiled f16"] = (copy.deepcopy(ours), True)
                round_weights(variants["compiled f16"][0], torch.float16)
            m = measure(variants, hf, llm, prompt, args)
            batch = measure_batches(ours, tok.vocab_size, args) if args.batches else None
            print_size(f"{n_layer}L/{n_embd}d", m, batch)
            if llm is not None:
                llm.close()


if __name__ == "__main__":
    main()
