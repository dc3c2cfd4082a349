"""Time to quality: what `zaizai train` learns in a wall-clock budget with its default preset, next to nanoGPT's
README CPU recipe given the same budget, on the same data split, one run after the other.

    .venv/bin/python bench/time_to_quality.py --corpus ../shared/corpora/tang.txt.xz --budgets 60,210,600
    .venv/bin/python bench/time_to_quality.py --corpus tang.txt.xz --budgets 210 --dtype float32   # a no-bf16 CPU
    .venv/bin/python bench/time_to_quality.py --corpus tang.txt.xz --budgets 210 --ablate          # each ingredient
    .venv/bin/python bench/time_to_quality.py --corpus tang.txt.xz --holdout my_prose.txt          # a 2nd corpus

For each corpus (``--corpus``, then ``--holdout``; a .txt, .txt.xz or folder of .txt files, see bench/corpus.py;
without --corpus the built-in demo corpus, so it runs from a clone alone) the text is prepared once (char
tokenizer, zaizai's default 10% document split), then for each budget:

- ``recipe``: preset ``nanogpt-cpu`` (nanoGPT's README CPU recipe: gpt 4 x 128, block 64, batch 12, lr 1e-3, fp32),
  its schedule fitted to the budget: ``--max-time`` with its 2,000-step cap lifted (``max_iters=0``), so its cosine
  decays over the whole budget, as the default's does;
- ``default``: what ``zaizai train --max-time BUDGET`` does (the `auto` preset: a modern block with Muon, its size
  chosen for this CPU, the budget and the corpus; its choice printed);
- with ``--ablate``, at the default's chosen size, batch and lr: ``gpt + adamw`` (neither ingredient),
  ``modern + adamw`` (the block alone) and ``gpt + muon`` (Muon alone).

Every run's budget is its whole wall time (setup, evaluations and the final pass included). The table gives the
loss over the whole validation split (nats per character; measured again after the run when its final pass was
cut short by the budget) and each run's difference to the recipe (negative: better than the recipe).
``--dtype`` sets the precision of every run but the recipe (fp32, as nanoGPT on a CPU): ``float32`` stands in for
a CPU without native bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from zaizai.common.device import autocast_dtype, cpu_has_fast_bf16
from zaizai.training.config import AUTO_COMMON

from corpus import add_corpus_argument, load_corpus

CHOSEN = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "lr", "warmup_iters")


def cpu_name() -> str:
    """The CPU's model name, as lscpu says it (else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runs_for(budget: float, args, chosen: dict | None) -> list[tuple[str, dict]]:
    """(label, train options) of the runs after the default; the ablations need the default's choice."""
    if not args.ablate or chosen is None:
        return []
    pinned = {**AUTO_COMMON, **chosen, "preset": "cpu", "dtype": args.dtype}  # nothing left to choose or measure
    return [("gpt + adamw", {**pinned, "model": "gpt", "optimizer": "adamw"}),
            ("modern + adamw", {**pinned, "model": "modern", "optimizer": "adamw"}),
            ("gpt + muon", {**pinned, "model": "gpt", "optimizer": "muon"})]


def whole_val_loss(out: Path, result, dtype: str) -> tuple[float, str]:
    """The run's loss over the whole val split: its own final pass, or (when the budget cut that pass short)
    the same pass over its last checkpoint, after the run."""
    if result.full_val_loss is not None and result.full_val_share == 1.0:
        return result.full_val_loss, ""
    from zaizai.data.batches import Batches
    from zaizai.data.tokendata import TokenData
    from zaizai.models import ModelConfig, build_model
    from zaizai.training.checkpoint import LAST, load_checkpoint
    from zaizai.training.evaluation import evaluate_split

    ckpt = load_checkpoint(out / LAST, with_optimizer=False)
    mcfg = ModelConfig.from_dict(ckpt.model_config)
    model = build_model(mcfg)
    model.load_state_dict(ckpt.model_state)
    model.eval()
    data = TokenData(ckpt.train_config["data_dir"])
    batches = Batches(data, mcfg.block_size, packed=bool(getattr(model, "supports_segments", False)))
    device = torch.device("cpu")
    return evaluate_split(model, batches, "val", 16, device, autocast_dtype(device, dtype)), " (after the run)"


def train_one(data: Path, out: Path, label: str, options: dict, budget: float, args) -> dict:
    import zaizai

    print(f"== {label}: --max-time {budget:g}", flush=True)
    options = {**options, "max_time": budget, "seed": args.seed}
    if args.threads:
        options["threads"] = args.threads
    result = zaizai.train(data, out, verbose=not args.quiet, **options)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    loss, note = whole_val_loss(out, result, config["train"]["dtype"])
    model, train = config["model"], config["train"]
    return dict(label=label, model=model["model"], optimizer=train["optimizer"], preset=train["preset"],
                size=f"{model['n_layer']}x{model['n_embd']} b{model['block_size']} bs{train['batch_size']}",
                steps=result.step, tokens=result.tokens_seen, seconds=result.elapsed, loss=loss, note=note,
                chosen={k: (model | train)[k] for k in CHOSEN})


def run_corpus(corpus, budgets: list[float], args, root: Path) -> list[tuple[float, list[dict]]]:
    import zaizai

    print(corpus.header(), flush=True)
    data = root / "data"
    zaizai.prepare([corpus.write(root)], data, verbose=False)
    table = []
    for budget in budgets:
        rows = [train_one(data, root / f"recipe-{budget:g}", "recipe (nanogpt-cpu)",
                          {"preset": "nanogpt-cpu", "max_iters": 0}, budget, args),
                train_one(data, root / f"default-{budget:g}", "default (zaizai train)",
                          {"dtype": args.dtype}, budget, args)]
        for i, (label, options) in enumerate(runs_for(budget, args, rows[1]["chosen"])):
            rows.append(train_one(data, root / f"ablate{i}-{budget:g}", label, options, budget, args))
        table.append((budget, rows))
    return table


def print_table(corpus, table, args) -> None:
    print()
    print(f"{corpus.name}: whole-val loss in nats/char after each budget · CPU {cpu_name()} · native bf16: "
          f"{'yes' if cpu_has_fast_bf16() else 'no'} · --dtype {args.dtype} · {torch.get_num_threads()} threads · "
          f"torch {torch.__version__} · seed {args.seed}")
    print(f"{'budget':>7}  {'run':<24} {'model':<7} {'optim':<6} {'size':<22} {'steps':>6} {'tokens':>11} "
          f"{'tok/s':>7} {'val':>7} {'vs recipe':>9}")
    for budget, rows in table:
        recipe = rows[0]["loss"]
        for r in rows:
            diff = "" if r is rows[0] else f"{r['loss'] - recipe:+.3f}"
            print(f"{budget:>6g}s  {r['label']:<24} {r['model']:<7} {r['optimizer']:<6} {r['size']:<22} "
                  f"{r['steps']:>6,} {r['tokens']:>11,} {r['tokens'] / max(r['seconds'], 1e-9):>7,.0f} "
                  f"{r['loss']:>7.4f} {diff:>9}{r['note']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_argument(p)
    p.add_argument("--holdout", default=None, metavar="PATH",
                   help="a second corpus, never tuned on: the same runs on it, in a table of its own")
    p.add_argument("--budgets", default="60,210,600", help="seconds of wall time per run, comma-separated "
                   "(default 60,210,600)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="precision of every run but the recipe (fp32): auto = bf16 where the CPU has it natively")
    p.add_argument("--ablate", action="store_true",
                   help="also gpt + adamw, modern + adamw and gpt + muon at the default's chosen size")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every run (0: zaizai's choice)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=None, help="keep the runs in this folder (default: a temporary one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        p.error(f"--budgets: comma-separated seconds, got {args.budgets!r}")
    if not budgets or min(budgets) <= 0:
        p.error("--budgets: give at least one positive number of seconds")
    corpora = [load_corpus(args.corpus)] + ([load_corpus(args.holdout)] if args.holdout else [])
    with tempfile.TemporaryDirectory(prefix="zaizai-ttq-") as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        tables = []
        for i, corpus in enumerate(corpora):
            root = base / f"{i}-{corpus.name.split('.')[0] or 'corpus'}"
            root.mkdir(parents=True, exist_ok=True)
            tables.append((corpus, run_corpus(corpus, budgets, args, root)))
    for corpus, table in tables:
        print_table(corpus, table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
