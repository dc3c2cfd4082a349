"""Prompts prefilled together go through the layers in passes of at most KVDecoder.PREFILL_TOKENS tokens: the
logits and caches are those of one pass (to float rounding)."""

from __future__ import annotations

import pytest
import torch

from zaizai.models.decode import KVDecoder, decoder_for
from util import decode_model as make, decode_prompt as prompt

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [7, 0, 3, 12, 1, 5, 9]  # an empty prompt among them: its row is empty, its logits None


@torch.inference_mode()
@pytest.mark.parametrize("kind, overrides", [("gpt", {}), ("modern", dict(n_kv_head=1)),
                                             ("modern", dict(qk_norm=False))])
def test_a_large_prefill_runs_in_bounded_passes_with_the_logits_and_caches_of_one_pass(kind, overrides,
                                                                                       dense_backend, monkeypatch):
    model = make(kind, **overrides)
    prompts = [prompt(n, seed=n) for n in LENGTHS]
    rows = list(range(len(prompts)))
    whole = decoder_for(model, rows=len(prompts))
    expected = whole.prefill_many(rows, prompts)

    monkeypatch.setattr(KVDecoder, "PREFILL_TOKENS", 8, raising=False)
    chunked = decoder_for(model, rows=len(prompts))
    passes = []
    run = chunked._run
    monkeypatch.setattr(chunked, "_run", lambda tokens, *a: passes.append(tokens.size(0)) or run(tokens, *a))
    got = chunked.prefill_many(rows, prompts)
    # 8 tokens a pass at most; a prompt longer than that (12) in a pass of its own; prompts stay in order
    assert passes == [7, 3, 12, 1 + 5, 9]
    assert got[1] is None and expected[1] is None
    # the same to float rounding (a product of fewer rows may add in another order; ~2e-7 here)
    for a, b in zip(got, expected):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.kv, whole.kv, atol=1e-5, rtol=1e-5)
    assert chunked.lengths == whole.lengths == LENGTHS
    tokens = torch.tensor([6 + row for row in rows])  # a step after it (the empty row starts from its token)
    torch.testing.assert_close(chunked.step(tokens), whole.step(tokens), atol=1e-5, rtol=1e-5)
