"""Chat: the prompt is the training rendering, history fits the budget, the CLI answers through stdin."""

from types import SimpleNamespace

import pytest

import zaizai
from zaizai.inference.chat import ChatSession
from zaizai.data.dialogue import render_conversation
from zaizai.common.errors import ZaizaiError
from zaizai.inference.sampling import SamplingConfig
from zaizai.data.tokenizer import ASSISTANT_ID, EOT_ID, USER_ID, CharTokenizer
from zaizai.inference.prompt import fit_text, text_ids
from util import TINY, run_cli, write_dialogues

DIALOGUES = [
    [("你好", "你好，我是崽崽。"), ("你会什么", "我会聊天。")],
    [("早上好", "早上好！")],
    [("你是谁", "我是崽崽。"), ("再见", "再见！")],
    [("晚安", "晚安，做个好梦。")],
]


def write_jsonl(path, copies=10):
    return write_dialogues(path, DIALOGUES * copies)


def fake_bot(block_size=40):
    tok = CharTokenizer.from_text("你好我是崽崽会聊天早上再见晚安，。！")
    return SimpleNamespace(tokenizer=tok, model_config=SimpleNamespace(block_size=block_size), is_chat_model=True)


def test_prompt_is_the_training_rendering_with_a_generation_prompt():
    bot = fake_bot(block_size=200)
    session = ChatSession(bot, system="你是崽崽", sampling=SamplingConfig(max_new_tokens=20))
    session.history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    ids = session.prompt_ids("再见")
    expected, _ = render_conversation(bot.tokenizer, [{"role": "system", "content": "你是崽崽"}, *session.history,
                                                      {"role": "user", "content": "再见"}], add_generation_prompt=True)
    assert ids == expected and ids[-1] == ASSISTANT_ID


def test_history_is_trimmed_oldest_first_to_fit_the_budget():
    bot = fake_bot(block_size=40)
    session = ChatSession(bot, sampling=SamplingConfig(max_new_tokens=10))
    for i in range(6):
        session.history += [{"role": "user", "content": "你好" * 2}, {"role": "assistant", "content": f"我是崽崽{i}"}]
    ids = session.prompt_ids("晚安")
    assert len(ids) + session.reply_budget() <= 40
    assert session.dropped_turns > 0 and session.dropped_turns % 2 == 0
    kept = session.history[session.dropped_turns:]
    expected, _ = render_conversation(bot.tokenizer, kept + [{"role": "user", "content": "晚安"}],
                                      add_generation_prompt=True)
    assert ids == expected
    # one more dropped exchange would have been needless: the budget is used, not wasted
    longer, _ = render_conversation(bot.tokenizer, session.history[session.dropped_turns - 2:] +
                                    [{"role": "user", "content": "晚安"}], add_generation_prompt=True)
    assert len(longer) + session.reply_budget() > 40


def test_a_message_longer_than_the_context_keeps_its_end():
    bot = fake_bot(block_size=30)
    session = ChatSession(bot, sampling=SamplingConfig(max_new_tokens=10))
    ids = session.prompt_ids("你好" * 40 + "晚安")
    assert len(ids) == 30 - session.reply_budget()
    assert bot.tokenizer.decode(ids[-4:-2]) == "晚安" and ids[1] == USER_ID


def test_a_plain_text_prompt_keeps_its_opening_token_and_its_end():
    tok = fake_bot().tokenizer
    ids = fit_text(tok, "你好" * 40 + "晚安", block_size=30, reply_budget=10)
    assert len(ids) == 20 and ids[0] == EOT_ID and tok.decode(ids[-2:]) == "晚安"
    assert fit_text(tok, "你好", 30, 10) == text_ids(tok, "你好") == [EOT_ID, *tok.encode("你好")]


def test_set_changes_sampling_and_refuses_nonsense():
    session = ChatSession(fake_bot())
    session.set("temperature", "0.3")
    session.set("top-k", "5")
    assert session.sampling.temperature == 0.3 and session.sampling.top_k == 5
    with pytest.raises(ZaizaiError, match="unknown option"):
        session.set("warmth", "1")
    with pytest.raises(ZaizaiError, match="--top-p"):
        session.set("top_p", "2")


def train_chat_model(tmp):
    """A tiny chat model trained on DIALOGUES until it knows them; returns its folder."""
    zaizai.prepare([write_jsonl(tmp / "chat.jsonl")], tmp / "data", val_fraction=0.2, verbose=False)
    zaizai.train(tmp / "data", tmp / "out", max_iters=60, verbose=False, **dict(TINY, block_size=32, lr=1e-2))
    return tmp / "out"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return train_chat_model(tmp_path_factory.mktemp("chat"))


def test_chat_cli_answers_lines_on_stdin(chat_model):
    r = run_cli("chat", chat_model, "--temperature", "0", input="你好\n\n晚安\n")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 2
    assert "Traceback" not in r.stderr and "completion mode" not in r.stderr
    again = run_cli("chat", chat_model, "--temperature", "0", "--message", "你好", "--message", "晚安")
    assert again.stdout.splitlines() == replies


def test_slash_commands_on_stdin_are_commands_not_messages(chat_model):
    alone = run_cli("chat", chat_model, "--temperature", "0", input="你好\n")
    assert alone.returncode == 0, alone.stderr
    first = alone.stdout.splitlines()
    assert len(first) == 1
    # /quit ends the chat: no reply to it, nothing after it is answered
    r = run_cli("chat", chat_model, "--temperature", "0", input="你好\n/quit\n晚安\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == first
    # /reset forgets the first exchange, so 你好 gets the same reply as in a fresh chat; feedback goes to stderr
    r = run_cli("chat", chat_model, "--temperature", "0", input="你好\n/reset\n/history\n/dance\n你好\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == first * 2
    assert "history cleared" in r.stderr and "(空 empty)" in r.stderr
    assert "未知命令 unknown command: /dance" in r.stderr and "Traceback" not in r.stderr
    # the same through --message
    m = run_cli("chat", chat_model, "--temperature", "0", "--message", "/set max_new_tokens 1", "--message", "你好",
                "--message", "/quit", "--message", "晚安")
    assert m.returncode == 0, m.stderr
    assert len(m.stdout.splitlines()) == 1 and "max_new_tokens = 1" in m.stderr


def test_a_plain_text_model_chats_in_completion_mode(tmp_path):
    from util import prepared

    data = prepared(tmp_path)
    zaizai.train(data, tmp_path / "out", max_iters=5, verbose=False, **TINY)
    r = run_cli("chat", tmp_path / "out", "--message", "床前", "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "completion mode" in r.stderr
    bot = zaizai.load(tmp_path / "out")
    expected = bot.generate("床前", max_new_tokens=5, seed=1, temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                            stop_at_eot=True)
    assert r.stdout == expected.strip() + "\n"


def test_chat_commands(capsys):
    from zaizai.terminal import run_command

    session = ChatSession(fake_bot())
    session.history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert run_command(session, "/history") is False
    assert "你好！" in capsys.readouterr().out
    run_command(session, "/set temperature 0.2")
    assert session.sampling.temperature == 0.2
    run_command(session, "/set top_p 7")
    assert "--top-p" in capsys.readouterr().out and session.sampling.top_p != 7
    run_command(session, "/reset")
    assert session.history == []
    run_command(session, "/dance")
    assert "unknown command" in capsys.readouterr().out
    run_command(session, "/")
    assert "unknown command" in capsys.readouterr().out
    assert run_command(session, "/quit") is True


# -- history: no more earlier exchanges than the model was trained on ---------------------------------------------

PAIRS = [("你好", "你好，我是崽崽。"), ("你会什么", "我会聊天。"), ("早上好", "早上好！"), ("晚安", "晚安，做个好梦。")]


@pytest.fixture(scope="module")
def single_turn_model(tmp_path_factory):
    """A tiny chat model trained on one-exchange dialogues (the articles' format: one question, one answer)."""
    from util import write_pairs

    tmp = tmp_path_factory.mktemp("single")
    zaizai.prepare([write_pairs(tmp / "pairs.jsonl", PAIRS * 10)], tmp / "data", val_fraction=0.2, verbose=False)
    zaizai.train(tmp / "data", tmp / "out", max_iters=60, verbose=False, **dict(TINY, block_size=32, lr=1e-2))
    return tmp / "out"


def _exchange(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_a_single_turn_model_answers_each_message_on_its_own(single_turn_model):
    bot = zaizai.load(single_turn_model)
    assert bot.trained_exchanges == 1
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    session = ChatSession(bot, sampling=greedy)
    first = session.say("你好")
    second_ids = session.prompt_ids("晚安")
    second = session.say("晚安")
    fresh = ChatSession(bot, sampling=greedy)
    assert second_ids == fresh.prompt_ids("晚安")  # the first exchange is not fed ...
    assert second == fresh.say("晚安")
    assert session.history == _exchange("你好", first) + _exchange("晚安", second)  # ... but still kept and shown
    assert session.history_note() and "--history N" in session.history_note()

    # --history 1 feeds the previous exchange
    kept = ChatSession(bot, sampling=greedy, keep_history=1)
    kept.history = _exchange("你好", first)
    expected, _ = render_conversation(bot.tokenizer, kept.history + [{"role": "user", "content": "晚安"}],
                                      add_generation_prompt=True)
    assert kept.prompt_ids("晚安") == expected and kept.history_note() is None
    with pytest.raises(ZaizaiError, match="--history"):
        ChatSession(bot, keep_history=-1)


def test_chat_cli_says_once_that_a_single_turn_model_answers_each_message_alone(single_turn_model):
    r = run_cli("chat", single_turn_model, "--temperature", "0", input="你好\n晚安\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("每句话单独回答") == 1 and "--history N" in r.stderr
    fresh = run_cli("chat", single_turn_model, "--temperature", "0", "--message", "晚安")
    assert r.stdout.splitlines()[1] == fresh.stdout.strip()
    kept = run_cli("chat", single_turn_model, "--temperature", "0", "--history", "1", "--message", "你好")
    assert kept.returncode == 0, kept.stderr
    assert "单独回答" not in kept.stderr


def test_a_multi_turn_model_keeps_the_history_it_was_trained_on(chat_model):
    bot = zaizai.load(chat_model)
    assert bot.trained_exchanges == 2  # DIALOGUES have up to two exchanges: one earlier exchange is kept
    session = ChatSession(bot, sampling=SamplingConfig(max_new_tokens=4, temperature=0))
    assert session.max_history == 1 and session.history_note() is None
    session.history = _exchange("你好", "你好") + _exchange("你会什么", "我会聊天。")
    expected, _ = render_conversation(bot.tokenizer, session.history[2:] + [{"role": "user", "content": "再见"}],
                                      add_generation_prompt=True)
    assert session.prompt_ids("再见") == expected and session.dropped_turns == 2


def test_unknown_turn_counts_keep_the_whole_history(chat_model, tmp_path):
    import json
    import shutil

    from zaizai.data.tokendata import trained_exchanges
    from zaizai.inference.prompt import fit_conversation, history_limit

    bot = fake_bot(block_size=200)  # no trained_exchanges: as a model whose data folder is gone
    assert history_limit(bot) is None and history_limit(bot, 3) == 3
    messages = _exchange("你好", "你好！") * 3 + [{"role": "user", "content": "晚安"}]
    full, dropped = fit_conversation(bot.tokenizer, messages, 200, 10)
    assert dropped == 0 and full == render_conversation(bot.tokenizer, messages, add_generation_prompt=True)[0]
    assert fit_conversation(bot.tokenizer, messages, 200, 10, max_history=1)[1] == 4
    # data prepared by an older zaizai (no count in meta.json), or no data folder at all
    data = tmp_path / "data"
    shutil.copytree(zaizai.load(chat_model).train_config["data_dir"], data)
    assert trained_exchanges(data) == 2
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    del meta["splits"]["train"]["max_exchanges"]
    (data / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert trained_exchanges(data) is None and trained_exchanges(tmp_path / "gone") is None


def test_the_api_keeps_the_same_history_as_chat(single_turn_model):
    from zaizai.serve.endpoints import CHAT, Server
    from zaizai.serve.schemas import ChatRequest

    bot = zaizai.load(single_turn_model)
    server = Server(bot, scheduler=None, model_name="m", token_cap=8)
    conversation = _exchange("你好", "你好，我是崽崽。") + [{"role": "user", "content": "晚安"}]
    ids, _ = CHAT.prompt(server, ChatRequest(messages=conversation, max_tokens=8))
    alone, _ = CHAT.prompt(server, ChatRequest(messages=conversation[-1:], max_tokens=8))
    session = ChatSession(bot, sampling=SamplingConfig(max_new_tokens=8))
    session.history = conversation[:2]
    assert ids == alone == session.prompt_ids("晚安")
    server.history = 1  # an explicit setting keeps the exchange, as `zaizai chat --history 1` does
    ids, _ = CHAT.prompt(server, ChatRequest(messages=conversation, max_tokens=8))
    assert ids == render_conversation(bot.tokenizer, conversation, add_generation_prompt=True)[0]


def test_serve_history_flag_reaches_the_server(single_turn_model):
    from zaizai.cli import build_parser
    from zaizai.serve.app import create_app

    bot = zaizai.load(single_turn_model)
    assert build_parser().parse_args(["serve", str(single_turn_model), "--history", "2"]).history == 2
    assert create_app(bot, history=2).state.server.history == 2
    assert create_app(bot).state.server.history is None
    with pytest.raises(ZaizaiError, match="--history"):
        create_app(bot, history=-1)
