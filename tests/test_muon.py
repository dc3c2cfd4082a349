"""Muon for the hidden matrices, AdamW for the rest: which parameters, the lr, exact resume, it learns."""

from __future__ import annotations

import json

import pytest
import torch

import zaizai
from zaizai.common.errors import ZaizaiError
from zaizai.models import ModelConfig, build_model
from zaizai.training.checkpoint import LAST, load_checkpoint, save_checkpoint
from zaizai.training.loop import train_step
from zaizai.training.optim import MuonAdamW, configure_optimizer, hidden_matrices
from util import TINY, prepared

VOCAB = 67

pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str = "modern", **overrides):
    cfg = dict(model=name, vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32)
    cfg.update(overrides)
    torch.manual_seed(0)
    return build_model(ModelConfig(**cfg))


def batches(step: int, B: int = 4, T: int = 16):
    g = torch.Generator().manual_seed(step)
    text = torch.tensor([(i * 7) % 13 for i in range(300)])  # a repeating pattern: learnable
    starts = torch.randint(0, 300 - T - 1, (B,), generator=g).tolist()
    rows = torch.stack([text[s:s + T + 1] for s in starts])
    return [(rows[:, :-1], rows[:, 1:], None)]


def steps(model, opt, start: int, stop: int, lr: float = 3e-3) -> list[float]:
    return [train_step(model, opt, batches(step), lr=lr, grad_accum=1, grad_clip=1.0, device=torch.device("cpu"))
            for step in range(start, stop)]


@pytest.mark.parametrize("name, muon_names", [
    ("modern", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("gpt", {"c_attn", "c_proj", "c_fc"}),
])
def test_muon_takes_the_hidden_matrices_adamw_the_rest(name, muon_names):
    model = make(name)
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert {n.split(".")[-2] for n in muon} == muon_names and all(n.endswith(".weight") for n in muon)
    assert muon.isdisjoint(adamw) and muon | adamw == set(names.values())
    assert not any("embed" in n or "wte" in n or "lm_head" in n for n in muon)
    assert {id(p) for p in hidden_matrices(model)} == {i for i, n in names.items() if n in muon}
    assert len(opt.param_groups) == len(opt.adamw.param_groups) + 1


def test_adamw_stays_plain_and_bigram_has_nothing_for_muon():
    assert type(configure_optimizer(make("gpt"), lr=1e-3, weight_decay=0.1)) is torch.optim.AdamW
    assert type(configure_optimizer(make("bigram"), lr=1e-3, weight_decay=0.1, optimizer="muon")) is torch.optim.AdamW
    with pytest.raises(ZaizaiError, match="unknown optimizer 'sgd'; choose one of: adamw, muon"):
        configure_optimizer(make("gpt"), lr=1e-3, weight_decay=0.1, optimizer="sgd")


def test_muon_steps_at_its_scaled_lr_and_keeps_the_schedule_value(monkeypatch):
    import zaizai.training.optim as optim

    model = make()
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.0, optimizer="muon")
    opt.muon.param_groups[0]["lr_scale"] = 4.0
    seen = []
    monkeypatch.setattr(opt.muon, "step", lambda: seen.append(opt.muon.param_groups[0]["lr"]))
    steps(model, opt, 0, 1, lr=0.0123)
    assert seen == [0.0123 * 4.0]
    assert all(g["lr"] == 0.0123 for g in opt.param_groups)  # what the loop set, exactly
    assert optim.MUON_LR_SCALE > 0


def test_state_dict_round_trips_through_a_checkpoint_and_resume_is_bitwise(tmp_path):
    model = make()
    opt = configure_optimizer(model, lr=3e-3, weight_decay=0.1, optimizer="muon")
    steps(model, opt, 0, 4)
    save_checkpoint(tmp_path / LAST, model, model_config=model.config.to_dict(), train_config={}, state={"step": 4},
                    optimizer=opt)
    steps(model, opt, 4, 8)  # the uninterrupted run

    ckpt = load_checkpoint(tmp_path / LAST)
    resumed = make()
    resumed.load_state_dict(ckpt.model_state)
    opt2 = configure_optimizer(resumed, lr=3e-3, weight_decay=0.1, optimizer="muon")
    opt2.load_state_dict(ckpt.optimizer_state)
    assert [g["optimizer"] for g in ckpt.optimizer_state["param_groups"]][-1] == "muon"
    steps(resumed, opt2, 4, 8)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    sd = opt2.state_dict()
    assert "optimizer" not in opt2.muon.param_groups[0] and "lr_scale" in opt2.muon.param_groups[0]
    assert len(sd["state"]) == sum(1 for _ in model.parameters())


def test_loading_adamw_state_into_muon_is_one_clear_line():
    model = make()
    adamw = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    steps(model, adamw, 0, 1)
    muon = configure_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon")
    with pytest.raises(ZaizaiError, match="not Muon \\+ AdamW.*resume with the optimizer the run started with"):
        muon.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("name", ["modern", "gpt"])
def test_loss_falls_with_muon(name):
    model = make(name)
    opt = configure_optimizer(model, lr=1e-2, weight_decay=0.0, optimizer="muon")
    losses = steps(model, opt, 0, 40, lr=1e-2)
    assert losses[-1] < losses[0] - 1.5


def test_interrupted_and_resumed_muon_run_equals_uninterrupted(tmp_path):
    data_dir = prepared(tmp_path)
    opts = dict(TINY, model="modern", optimizer="muon", max_iters=10, grad_accum=2, verbose=False)
    zaizai.train(data_dir, tmp_path / "a", **opts)
    stopped = zaizai.train(data_dir, tmp_path / "b", on_step=lambda s: s["step"] == 5, **opts)
    assert stopped.stopped_by == "interrupt" and stopped.step == 5
    zaizai.train(out_dir=tmp_path / "b", resume=True, verbose=False)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, lines)]

    assert losses("a") == losses("b")
    a, b = load_checkpoint(tmp_path / "a" / LAST), load_checkpoint(tmp_path / "b" / LAST)
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert a.train_config["optimizer"] == "muon" and a.model_config["model"] == "modern"
    assert all(torch.equal(a.optimizer_state["state"][i][k], t)
               for i, s in b.optimizer_state["state"].items() for k, t in s.items())
    bot = zaizai.load(tmp_path / "b")  # and the trained modern model samples, past its 16-token window
    text = bot.generate("床前", max_new_tokens=40, temperature=0.8, seed=3)
    assert text and text == bot.generate("床前", max_new_tokens=40, temperature=0.8, seed=3)


def test_the_embedding_steps_at_its_own_lr_scale(monkeypatch):
    import zaizai.training.optim as optim

    model = make()  # modern: the output layer is tied to embed_tokens
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon")
    embed = [g for g in opt.adamw.param_groups if g.get("lr_scale")]
    assert [p for g in embed for p in g["params"]] == [model.model.embed_tokens.weight]
    assert embed[0]["lr_scale"] == optim.EMBED_LR_SCALE > 1 and embed[0]["weight_decay"] == 0.1
    seen = []
    monkeypatch.setattr(opt.adamw, "step", lambda: seen.append([g["lr"] for g in opt.adamw.param_groups]))
    steps(model, opt, 0, 1, lr=0.01)
    assert seen == [[0.01, 0.01 * optim.EMBED_LR_SCALE]]  # (tied: no other 2-D weight is AdamW's) vectors, embedding
    assert all(g["lr"] == 0.01 for g in opt.param_groups)  # the schedule's value back, exactly
    gpt = make("gpt")
    tables = [g for g in configure_optimizer(gpt, lr=1e-3, weight_decay=0.1, optimizer="muon").adamw.param_groups
              if "lr_scale" in g]
    assert {id(p) for p in tables[0]["params"]} == {id(gpt.transformer.wte.weight), id(gpt.transformer.wpe.weight)}
    assert not any("lr_scale" in g for g in configure_optimizer(gpt, lr=1e-3, weight_decay=0.1).param_groups)


@pytest.mark.parametrize("tied", [True, False])
def test_a_checkpoint_from_before_the_embedding_group_resumes_with_every_state(tied):
    """Muon checkpoints written when the embedding shared AdamW's decay group load into today's layout: each
    parameter gets its own moments back."""
    model = make(tie_embeddings=tied)  # AdamW today: (lm_head when untied,) vectors, embedding
    matrices = hidden_matrices(model)
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    old = MuonAdamW(torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                                       {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=3e-3),
                    torch.optim.Muon([{"params": matrices, "lr_scale": 2.0}], lr=3e-3, adjust_lr_fn="match_rms_adamw"))
    steps(model, old, 0, 3)
    saved = old.state_dict()
    assert len([g for g in saved["param_groups"] if g["optimizer"] == "adamw"]) == 2
    new = configure_optimizer(model, lr=3e-3, weight_decay=0.1, optimizer="muon")
    new.load_state_dict(saved)
    for optimizer in (old.adamw, old.muon):
        for p, s in optimizer.state.items():
            mine = new.adamw.state.get(p) or new.muon.state.get(p)
            assert mine is not None and mine.keys() == s.keys()
            assert all(torch.equal(mine[k], s[k]) for k in s)
    steps(model, new, 3, 4)  # and it trains on
