"""The report card: ``report.md`` in a training output folder, a model card a user can share.

It gathers the run's config, data statistics, parameter count, training time and tokens seen, final
losses, the evaluation metrics (``eval.json``, computed first when missing), sample outputs and the
loss-curve picture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write_text
from ..inference.chat import ChatSession
from ..inference.loaded import load
from ..inference.sampling import SamplingConfig
from ..training.metrics import LOSS_PNG, plot_losses, read_metrics
from .evaluation import evaluate, format_dialogue, load_eval, md_code, md_text

REPORT_MD = "report.md"
SAMPLE_PROMPTS = ("", "春", "你好")
# The chat questions in both scripts: a model trained on traditional Chinese is asked in traditional Chinese.
CHAT_QUESTIONS = {"simplified": ("你好", "你是谁？", "你喜欢什么？"), "traditional": ("你好", "你是誰？", "你喜歡什麼？")}


def chat_questions(tokenizer) -> tuple[str, ...]:
    """The sample questions in the script the tokenizer knows better (fewer unknown characters; simplified on a tie)."""
    return min(CHAT_QUESTIONS.values(), key=lambda qs: len(tokenizer.unknown_chars("".join(qs))))


def write_report(out_dir: str | Path, data_dir: str | Path | None = None, *, device: str = "auto",
                 max_pairs: int = 200, reevaluate: bool = False, verbose: bool = True) -> Path:
    """Write ``out_dir/report.md`` (running :func:`zaizai.evals.evaluation.evaluate` if there is no ``eval.json``)."""

    out = Path(out_dir)
    config = _read_config(out)
    results = None if reevaluate else load_eval(out)
    if results is None:
        results = evaluate(out, data_dir, device=device, max_pairs=max_pairs, verbose=verbose)
    bot = load(out, device=device)
    records = read_metrics(out)
    if records:
        plot_losses(out, records)

    mcfg, tcfg, meta, state = config["model"], config["train"], config.get("data") or {}, bot.state
    c = bot.model_config  # the checkpoint's own, checked when it loaded
    lines = [f"# 崽崽 zaizai 模型报告 model card: {md_text(out.resolve().name)}", ""]
    lines += ["## 模型 Model", "",
              f"- {c.model} · **{bot.num_params():,}** 参数 parameters · {c.n_layer} layers · "
              f"{c.n_head} heads · n_embd {c.n_embd} · block_size {c.block_size} · vocab {c.vocab_size:,}",
              f"- checkpoint: {md_code(Path(results.get('checkpoint', bot.path)).name)} at step "
              f"{state.get('step')}", ""]
    data_dir = str(results.get("data_dir", tcfg.get("data_dir")))
    lines += ["## 数据 Data", "", f"- folder: {md_code(data_dir)} · kind {meta.get('kind', 'plain')} · "
              f"tokenizer {meta.get('tokenizer')} · vocab {_count(meta.get('vocab_size'))}", ""]
    lines += ["| split | tokens | chars | documents / dialogues | unknown |", "|---|---|---|---|---|"]
    splits = meta.get("splits")
    for split, info in (splits.items() if isinstance(splits, dict) else ()):
        info = info if isinstance(info, dict) else {}
        lines.append(f"| {md_text(split)} | {_count(info.get('tokens', 0))} | {_count(info.get('chars', 0))} | "
                     f"{_count(info.get('documents', info.get('dialogues', 0)))} | {_count(info.get('unknown', 0))} |")
    lines += ["", "## 训练 Training", ""]
    # the whole run (the evaluated checkpoint may be `best`, saved earlier)
    run = records[-1] if records else {"step": state.get("step", 0), "tokens": state.get("tokens_seen", 0),
                                       "elapsed": state.get("elapsed", 0.0)}
    elapsed = run.get("elapsed", 0.0)
    lines += [f"- {run['step']:,} steps · {run['tokens']:,} tokens seen · {elapsed:.0f} s ({elapsed / 60:.1f} min)"
              + (f" · {run['tokens'] / elapsed:,.0f} tokens/s" if elapsed else ""),
              f"- preset {tcfg.get('preset')} · batch {tcfg.get('batch_size')} x {tcfg.get('grad_accum')} · "
              f"lr {tcfg.get('lr')} · warmup {tcfg.get('warmup_iters')} · weight decay {tcfg.get('weight_decay')} · "
              f"dropout {mcfg.get('dropout')} · seed {tcfg.get('seed')}"]
    if records:
        last = records[-1]
        best = min((r["val_loss"] for r in records if r.get("val_loss") is not None), default=None)
        lines.append(f"- final losses (step {last['step']}): train {_num(last.get('train_loss'))} · val "
                     f"{_num(last.get('val_loss'))} nats/token"
                     + (f" · best val {best:.4f}" if best is not None else ""))
    if (out / LOSS_PNG).is_file():
        lines += ["", f"![loss curves]({LOSS_PNG})"]
    config_json = json.dumps({"model": mcfg, "train": tcfg}, ensure_ascii=False, indent=2)
    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", config_json)), default=0))
    lines += ["", "<details><summary>config.json</summary>", "", fence + "json", config_json, fence, "",
              "</details>", ""]

    loss = results["loss"]
    lines += ["## 评估 Evaluation", "",
              f"Whole validation split ({loss['tokens']:,} target tokens · {loss['chars']:,} chars · "
              f"{loss['bytes']:,} UTF-8 bytes):", "",
              "| loss (nats/token) | perplexity | bits/char | bits/byte |", "|---|---|---|---|",
              f"| {loss['loss']:.4f} | {loss['perplexity']:.2f} | {loss['bits_per_char']:.4f} | "
              f"{loss['bits_per_byte']:.4f} |", ""]
    if "dialogue" in results:
        lines += [format_dialogue(results["dialogue"]), ""]
    lines += ["## 样例 Samples", ""]
    lines += _samples(bot)
    if (out / "attention.png").is_file():
        lines += ["", "## 注意力 Attention", "", "![attention](attention.png)"]
    lines += ["", f"_zaizai {md_text(str(config.get('zaizai_version', '')))} · {md_code(f'zaizai report {out}')}_", ""]
    path = out / REPORT_MD
    atomic_write_text(path, "\n".join(lines))
    if verbose:
        print(f"已写入 written: {path}")
    return path


def _read_config(out: Path) -> dict[str, Any]:
    """The folder's config.json, checked to hold the "model" and "train" tables the report reads."""
    path = out / "config.json"
    if not path.is_file():
        raise ZaizaiError(f"{out} has no config.json; give a folder written by `zaizai train`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ZaizaiError(f"{path} 已损坏 is damaged ({str(e) or type(e).__name__}); restore it from a backup "
                          "or train again") from None
    except OSError as e:
        raise ZaizaiError(f"cannot read {path} ({e.strerror or e})") from None
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)
            and isinstance(config.get("train"), dict) and isinstance(config.get("data", {}), dict)):
        raise ZaizaiError(f"{path} 已损坏 is damaged (no \"model\" and \"train\" tables); restore it from a "
                          "backup or train again")
    return config


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else "n/a"


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _samples(bot) -> list[str]:
    """A sentence, a blank line and a list of seeded samples (each one line of escaped text)."""
    lines = []
    if bot.is_chat_model:
        lines += ["Chat replies (temperature 0.7, top-p 0.9, seeded):", ""]
        for k, message in enumerate(chat_questions(bot.tokenizer)):
            session = ChatSession(bot, sampling=SamplingConfig(max_new_tokens=60, temperature=0.7, top_p=0.9,
                                                               seed=k))
            reply = session.say(message).strip()
            lines.append(f"- 你 you: {md_text(message)} → 崽崽: {md_text(reply) if reply else '(空 empty)'}")
    else:
        lines += ["Continuations (temperature 0.8, seeded; the prompt in bold):", ""]
        for k, prompt in enumerate(SAMPLE_PROMPTS):
            text = bot.generate(prompt, max_new_tokens=80, temperature=0.8, seed=k, stop_at_eot=True)
            shown = f"**{md_text(prompt)}**" if prompt else "(空提示 empty prompt) "
            lines.append(f"- {shown}{md_text(text.strip())}")
    return lines
