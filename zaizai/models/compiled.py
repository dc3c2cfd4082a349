"""A decode step for one sequence compiled ahead of time (torch.export, then AOTInductor): ``--compile`` on CPU.

At batch 1 a decode step reads every weight once and does little arithmetic with it, so its time is the weights'
read from memory plus the cost of each operation launched. The eager step (:mod:`zaizai.models.decode`) launches
~15 library calls a layer, and oneDNN's matrix-vector products read fp32 weights at ~15 GB/s on the 2-core AMD
EPYC this project measures on, where a plain ``sum()`` over the same weights reads 23 GB/s. Here the whole step,
every layer and the output layer, is one pure function of the new token, its position and the cache before it;
Inductor fuses it into C++ loops, each product written as ``(W * x).sum(-1)``: a reduction over each weight row,
read once, in order (6L/384d, the 25 products alone: 2.7 ms against oneDNN's 3.8; ``bench/generate_speed.py``
has the whole step). The transposed form, ``(W^T * x[:, None]).sum(0)``, reads 2.7x slower (7.6 GB/s). A step of
several rows stays eager: there each weight is read once for all of them, which this form would not do.

The function writes nothing: it returns the logits and the new token's keys and values, and the decoder writes
them into its cache (a cache written inside the compiled graph is copied whole, 19 MB at 6L/384d, by
functionalization). The cache's length is a dynamic size (``torch.export.Dim``), so one compilation serves every
length. The weights are passed as one flat buffer per dtype (:func:`flat_weights`, made once per model), not ~80
tensors.

Compiled ahead of time, not with ``torch.compile``: a token then costs one call into the package's C++, with no
dynamo guards, no Python wrapper allocating each intermediate buffer, and no per-call pytree lay-out (:func:`_direct`).
In one process, 500 greedy tokens: 1.6x faster at 4L/128d and 1.2-1.3x at 6L/384d than the same step through
``torch.compile``. Compiling takes ~20-30 s; the package (a few MB) is kept in :func:`cache_dir`, one per model
shape, torch version, CPU and thread count, and a later run loads it in well under a second (``torch.compile``
needed a few seconds in every process).

16-bit weights (``--weights float16``, :func:`round_weights`): the model's matrices rounded to float16 or bfloat16,
which the compiled step reads at that size and widens in its loops: half the bytes of a token's read, the
arithmetic still float32 (6L/384d's 25 products: 1.0 ms against 2.4). That is what llama.cpp's F16 file holds.

It needs a C++ compiler (gcc or clang; MSVC on Windows). Where compiling fails, the decoder says so once, in one
line, and goes on with the eager step, which gives the same logits to float rounding: nothing else changes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import platform
import sys
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (C_in,) W^T (+ b): w (C_out, C_in) read row by row, a reduction Inductor fuses with what is around it."""
    y = (w.float() * x).sum(-1)  # 16-bit weights (round_weights) widened in the loop: fp32 arithmetic
    return y if b is None else y + b


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
            values: torch.Tensor) -> torch.Tensor:
    """One query per head against the cache and the new token: q (nh, hs), already scaled; k, v (nkv, hs) the
    new token's; keys, values (nkv, p, hs) the p tokens before it. Query head h reads key/value head
    h // (nh / nkv). -> (nh * hs,). An fp32 cache is read with bmm (Inductor turns a one-row bmm into loops of its
    own): 1.03-1.15x faster at 100-900 tokens of cache than elementwise products and sums (6L/384d, interleaved).
    A 16-bit cache is read with the latter, widened in the loop: a bmm would take a widened copy of it."""
    nkv, p, hs = keys.shape
    q = q.view(nkv, -1, hs)  # (nkv, group, hs)
    if keys.dtype == torch.float32:
        old = torch.bmm(q, keys.transpose(1, 2))  # (nkv, group, p)
    else:
        old = (keys.unsqueeze(1).float() * q.unsqueeze(2)).sum(-1)
    new = (q * k.unsqueeze(1)).sum(-1, keepdim=True)  # (nkv, group, 1)
    att = torch.softmax(torch.cat([old, new], dim=-1), dim=-1)
    if values.dtype == torch.float32:
        y = torch.bmm(att[..., :p], values)  # (nkv, group, hs)
    else:
        y = (att[..., :p].unsqueeze(-1) * values.unsqueeze(1).float()).sum(2)
    y = y + att[..., p:] * v.unsqueeze(1)
    return y.reshape(-1)


def as_cached(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Keys or values ``x`` as a cache of ``dtype`` holds them: rounded to it, in x's own type still (None: as is).
    A model with 16-bit weights rounds them to 16 bits, eagerly (the decoder) and compiled alike."""
    return x if dtype is None or dtype == x.dtype else x.to(dtype).to(x.dtype)


def gpt_step(token: torch.Tensor, pos: torch.Tensor, past: tuple, weights: tuple, n_head: int, eps: float):
    """GPT-2, one token: token (1,), pos (1,), past: each layer's (keys, values) before it, (nh, p, hs) each ->
    (logits (1, V), the new token's keys and values (n_layer, 2, nh, hs))."""
    wte, wpe, lnf_w, lnf_b, head, layers = weights
    C = wte.size(1)
    hs = C // n_head
    x = (wte[token].float() + wpe[pos].float())[0]  # (C,)
    new = []
    for (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b), kv in zip(layers, past):
        q, k, v = _product(F.layer_norm(x, (C,), ln1_w, ln1_b, eps), attn_w, attn_b).view(3, n_head, hs)
        k, v = as_cached(k, kv[0].dtype), as_cached(v, kv[0].dtype)
        new.append(torch.stack((k, v)))
        x = x + _product(_attend(q * hs ** -0.5, k, v, *kv), proj_w, proj_b)
        h = F.gelu(_product(F.layer_norm(x, (C,), ln2_w, ln2_b, eps), fc_w, fc_b), approximate="tanh")
        x = x + _product(h, out_w, out_b)
    return _product(F.layer_norm(x, (C,), lnf_w, lnf_b, eps), head).unsqueeze(0), torch.stack(new)


def modern_step(token: torch.Tensor, pos: torch.Tensor, past: tuple, weights: tuple, n_head: int, eps: float):
    """The modern (Qwen3-style) model, one token: as :func:`gpt_step`, the past (nkv, p, hs) each. Each layer's
    ``qk_w`` (nh + nkv, hs) holds the QK-norm weights with the attention scale folded into the queries' rows, and
    the sine table carries RoPE's sign (see :class:`~zaizai.models.decode.ModernDecoder`)."""
    embed, norm_w, head, cos, sin, layers = weights
    C = embed.size(1)
    nkv, _, hs = past[0][0].shape
    cos, sin = cos[pos], sin[pos]  # (1, hs)
    x = embed[token][0].float()  # (C,)
    new = []
    for (ln1, q_w, k_w, v_w, qk_norm, qk_w, o_w, ln2, gate_w, up_w, down_w), kv in zip(layers, past):
        h = F.rms_norm(x, (C,), ln1, eps)
        qk = torch.cat([_product(h, q_w), _product(h, k_w)]).view(n_head + nkv, hs)
        qk = (F.rms_norm(qk, (hs,), None, eps) if qk_norm else qk) * qk_w
        qk = qk * cos + qk.roll(hs // 2, dims=-1) * sin
        q, k, v = qk[:n_head], qk[n_head:], _product(h, v_w).view(nkv, hs)
        k, v = as_cached(k, kv[0].dtype), as_cached(v, kv[0].dtype)
        new.append(torch.stack((k, v)))
        x = x + _product(_attend(q, k, v, *kv), o_w)
        h = F.rms_norm(x, (C,), ln2, eps)
        x = x + _product(F.silu(_product(h, gate_w)) * _product(h, up_w), down_w)
    return _product(F.rms_norm(x, (C,), norm_w, eps), head).unsqueeze(0), torch.stack(new)


def _bound(fn, layout, n_head: int, eps: float):
    """``fn`` (:func:`gpt_step` or :func:`modern_step`) of the weights :func:`flatten` laid out as ``layout``, as a
    function of (token, pos, past, buffers): what is compiled."""
    def step(token, pos, past, buffers):
        return fn(token, pos, past, unflatten(buffers, layout), n_head, eps)
    return step


ALIGN = 32  # elements: each tensor of a flat buffer starts on a 64-byte line (16-bit) or two (fp32)


class Slot(NamedTuple):
    """Where :func:`flatten` put a tensor: buffer ``buffer``, from element ``offset``, shaped ``shape``."""
    buffer: int
    offset: int
    shape: tuple


def flatten(weights) -> tuple[tuple[torch.Tensor, ...], object]:
    """``weights`` (nested tuples of tensors and flags) as one contiguous buffer per dtype and its layout: the same
    nesting with each tensor replaced by (buffer index, offset, shape), what :func:`unflatten` reads back. A
    tensor named twice (tied embeddings) is stored once. One buffer or two, not ~80 weights, to hand over at every
    call (through torch.compile, whose guards checked each input, a 4L/128d step took ~0.1 ms less)."""
    dtypes: list[torch.dtype] = []
    parts: list[list[torch.Tensor]] = []
    sizes: list[int] = []
    seen: dict[int, tuple] = {}

    def place(w):
        if isinstance(w, (tuple, list)):
            return tuple(place(x) for x in w)
        if not isinstance(w, torch.Tensor):
            return w
        if id(w) not in seen:
            if w.dtype not in dtypes:
                dtypes.append(w.dtype)
                parts.append([])
                sizes.append(0)
            i = dtypes.index(w.dtype)
            n = w.numel()
            seen[id(w)] = Slot(i, sizes[i], tuple(w.shape))
            pad = -n % ALIGN
            parts[i] += [w.reshape(-1), w.new_zeros(pad)] if pad else [w.reshape(-1)]
            sizes[i] += n + pad
        return seen[id(w)]

    layout = place(weights)
    return tuple(torch.cat(p) for p in parts), layout


def unflatten(buffers: tuple, layout):
    """The weights :func:`flatten` laid out: views of ``buffers``."""
    if isinstance(layout, Slot):
        return buffers[layout.buffer][layout.offset:layout.offset + math.prod(layout.shape)].view(layout.shape)
    if isinstance(layout, tuple):
        return tuple(unflatten(buffers, x) for x in layout)
    return layout


def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every matrix of ``model`` (its 2-D parameters: the products' weights and the embeddings) to ``dtype``
    (torch.float16 or torch.bfloat16), for good. They stay float32 tensors, so every step (eager or compiled, one
    sequence or many) computes with the same values, and ``model.weights_dtype`` records it. A compiled step then
    keeps these matrices in ``dtype`` (see :func:`detached`): half the bytes to read a token. The vectors (norms,
    biases) stay float32, as llama.cpp's F16 files keep them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.to(dtype))
    model.weights_dtype = dtype


def detached(weights, dtype: torch.dtype | None = None, memo: dict | None = None):
    """``weights`` (tuples and lists of tensors and flags) with every tensor detached: the compiled step takes
    no part in autograd. ``dtype``: the model's 2-D parameters (rounded to it by :func:`round_weights`) stored in
    it, one copy for a tensor named twice (tied embeddings)."""
    memo = {} if memo is None else memo
    if isinstance(weights, (tuple, list)):
        return tuple(detached(w, dtype, memo) for w in weights)
    if not isinstance(weights, torch.Tensor):
        return weights
    if dtype is None or not isinstance(weights, torch.nn.Parameter) or weights.dim() != 2:
        return weights.detach()
    if id(weights) not in memo:
        memo[id(weights)] = weights.detach().to(dtype)
    return memo[id(weights)]


def weights_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The 16-bit type :func:`round_weights` rounded the model's matrices to (None: not rounded)."""
    return getattr(model, "weights_dtype", None)


_FLAT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its tensors' versions, flat weights)


def flat_weights(model: torch.nn.Module, weights: tuple) -> tuple:
    """:func:`flatten` of ``weights`` (the model's, or made from them), detached, 2-D parameters in the dtype
    :func:`round_weights` gave the model: made once per model and again after any of its parameters or buffers
    changes (a Batch makes a decoder per generation; the copy is the size of the model)."""
    tensors = [*model.parameters(), *model.buffers()]
    dtype = weights_dtype(model)
    if any(t.is_inference() for t in tensors):  # no version counter to tell a change: lay out every time
        return flatten(detached(weights, dtype))
    version = (dtype, tuple((t.data_ptr(), t._version) for t in tensors))
    held = _FLAT.get(model)
    if held is None or held[0] != version:
        held = (version, flatten(detached(weights, dtype)))
        _FLAT[model] = held
    return held[1]


_COMPILED: dict = {}  # package key (see _package_key) -> its loaded step, shared by every decoder of such a model (a
# Batch makes one per generation)
_FAILED: list[str] = []  # why compiling failed in this process (then every decoder steps eagerly)
BUILT: list[str] = []  # the keys of the packages this process compiled (the others it loaded from the cache)


def cache_dir() -> Path:
    """Where compiled decode steps are kept between runs: $ZAIZAI_CACHE_DIR, else $XDG_CACHE_HOME/zaizai, else
    ~/.cache/zaizai (one .pt2 package per model shape, torch version and CPU; a few MB each)."""
    if os.environ.get("ZAIZAI_CACHE_DIR"):
        return Path(os.environ["ZAIZAI_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "zaizai"
    try:
        return Path.home() / ".cache" / "zaizai"
    except RuntimeError:  # no home folder to be found: the temporary folder
        return Path(tempfile.gettempdir()) / "zaizai-cache"


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """This module's source, torch's version and the CPU the code is compiled for (Inductor picks its vector
    instructions from the CPU's flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    cpu = f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()} {flags.strip()}"
    return f"{source} {torch.__version__} {cpu}"


def _package_key(step: CompiledStep, past: tuple, window: int) -> str:
    """What a compiled step's code depends on, hashed: this module's source, torch, the CPU and thread count,
    the step's function, the model's shape and the dtypes and strides of what it is given."""
    parts = [_machine(), torch.get_num_threads(), step.fn.__name__,
             step.n_head, step.eps, step.layout, [(b.dtype, b.shape) for b in step.buffers], step.kv_dtype, window,
             [(t.dtype, t.shape[0], t.shape[2], t.stride()) for kv in past for t in kv], sorted(step.OPTIONS.items())]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


class _Step(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, token, pos, past, buffers):
        return self.fn(token, pos, past, buffers)


def _build(step: CompiledStep, token: torch.Tensor, pos: torch.Tensor, past: tuple, window: int) -> bytes:
    """The step compiled ahead of time (torch.export, then AOTInductor) for every cache length from MIN_PAST to
    window - 1: a .pt2 package's bytes."""
    p = torch.export.Dim("p", min=step.MIN_PAST, max=window - 1)
    dynamic = (None, None, tuple(({1: p}, {1: p}) for _ in past), tuple(None for _ in step.buffers))
    package = io.BytesIO()
    with warnings.catch_warnings():  # torch's own deprecation notes about its internals: nothing a user can do
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(_Step(_bound(step.fn, step.layout, step.n_head, step.eps)),
                                      (token, pos, past, step.buffers), dynamic_shapes=dynamic)
        torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=dict(step.OPTIONS))
    return package.getvalue()


def _load(step: CompiledStep, token: torch.Tensor, pos: torch.Tensor, past: tuple, window: int):
    """The compiled step for this model shape: from the cache (:func:`cache_dir`), or compiled now and kept there
    (written atomically; where the cache cannot be written, in a temporary folder for this process)."""
    from ..common.fileio import atomic_write

    key = _package_key(step, past, window)
    if key in _COMPILED:
        return _COMPILED[key]
    path = cache_dir() / "compiled" / f"step-{key}.pt2"
    runner = None
    if path.is_file():
        try:
            runner = torch._inductor.aoti_load_package(str(path))
        except Exception:  # noqa: BLE001 - unreadable (another torch, a damaged file): compile it again
            runner = None
    if runner is None:
        data = _build(step, token, pos, past, window)
        BUILT.append(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError:
            path = Path(tempfile.mkdtemp(prefix="zaizai-compiled-")) / path.name
            path.write_bytes(data)
        runner = torch._inductor.aoti_load_package(str(path))
    _COMPILED[key] = _direct(runner, (token, pos, past, step.buffers))
    return _COMPILED[key]


def _flat(token: torch.Tensor, pos: torch.Tensor, past: tuple, buffers: tuple) -> list:
    flat = [token, pos]
    for keys, values in past:
        flat += (keys, values)
    return [*flat, *buffers]


def _direct(runner, example: tuple):
    """``runner`` (a loaded package) called on its inputs in a flat list, as the package's own call passes them
    after laying them out with torch's pytree (4L/128d: that lay-out took a quarter of a step's time). Where the
    loaded package has no such entry point, or lays out ``example`` otherwise, the runner itself."""
    from torch.utils import _pytree

    run = getattr(getattr(runner, "loader", None), "boxed_run", None)
    leaves, flat = _pytree.tree_leaves((example, {})), _flat(*example)
    if run is None or len(leaves) != len(flat) or any(a is not b for a, b in zip(leaves, flat)):
        return runner
    return lambda token, pos, past, buffers: run(_flat(token, pos, past, buffers))


class CompiledStep:
    """A decoder's compiled one-sequence step: ``fn`` (:func:`gpt_step` or :func:`modern_step`) on the weights of
    :func:`flat_weights`, and for 16-bit weights the 16-bit copy of row 0's cache it reads."""

    MIN_PAST = 2  # a cache of 0 or 1 token would be compiled again as a special size: the eager step takes those
    # Inductor's options for this graph: every intermediate kept in a buffer of its own. By default a product's
    # input (an embedding lookup and a layer norm, say) is recomputed inside its loop for each of the weight's
    # rows, which makes the loop compute-bound; these are vectors of a few hundred floats, so keeping them costs
    # nothing (6L/384d: 3.4 vs 4.0 ms a step, interleaved).
    # Casts to 16 bits round as they do eagerly (new keys and values rounded as the cache holds them); by default
    # Inductor drops a down-and-up cast pair in a fused loop.
    OPTIONS = {"realize_opcount_threshold": 0, "emulate_precision_casts": True}

    def __init__(self, fn, flat: tuple, n_head: int, eps: float, window: int, kv_dtype: torch.dtype | None = None):
        """``flat``: the weights as :func:`flat_weights` gives them, (buffers, layout). ``window``: the tokens a
        cache row holds (block_size). ``kv_dtype``: the 16-bit type the decoder rounds keys and values to (a model
        with 16-bit weights): the step then reads a copy of row 0's cache in that type (:meth:`past`), half the
        bytes."""
        self.fn, self.n_head, self.eps, self.window, self.kv_dtype = fn, n_head, eps, window, kv_dtype
        self.buffers, self.layout = flat
        self.runner = None  # the compiled step for this model's shape, found at the first call (which compiles it)
        self.steps = 0  # steps it has run
        self.mirror: torch.Tensor | None = None  # row 0's keys and values in kv_dtype, like the cache's row 0
        self.mirrored = 0  # positions [0, mirrored) of the mirror hold row 0's

    def past(self, row0: list, p: int) -> tuple:
        """What the step reads of row 0's cache, p tokens: each layer's (keys, values), views of ``row0`` (each
        layer's row-0 (keys, values), (heads, block_size, hs) each) or of its 16-bit mirror, brought up to date."""
        if self.kv_dtype is not None:
            if self.mirror is None:  # (n_layer, 2, heads, block_size, hs), and each layer's (keys, values) views
                keys = row0[0][0]
                self.mirror = torch.empty(len(row0), 2, *keys.shape, dtype=self.kv_dtype, device=keys.device)
                self.mirror_rows = list(zip(self.mirror[:, 0], self.mirror[:, 1]))
                self.mirrored = 0
            if self.mirrored < p:  # what eager steps wrote (a prefill, several rows): exact, the values are rounded
                for copy, layer in zip(self.mirror_rows, row0):
                    for mine, theirs in zip(copy, layer):
                        mine[:, self.mirrored:p].copy_(theirs[:, self.mirrored:p])
            self.mirrored = p
            row0 = self.mirror_rows
        return tuple((keys[:, :p], values[:, :p]) for keys, values in row0)

    def wrote(self, new: torch.Tensor, p: int) -> None:
        """The step's new keys and values ``new`` (n_layer, 2, heads, hs) went to position p of row 0."""
        if self.mirror is not None and self.mirrored == p:
            self.mirror[:, :, :, p] = new
            self.mirrored = p + 1

    def forget(self) -> None:
        """Row 0 holds another sequence now (a new one, one moved there, or none): the mirror is out of date."""
        self.mirrored = 0

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, past: tuple):
        """past: each layer's (keys, values), (nkv, p, hs) each, views of a decoder's cache whose strides do not
        depend on how many rows it has (a server's cache grows: that must not compile the step again) -> (logits
        (1, V), the new keys and values (n_layer, 2, nkv, hs)), or None where compiling failed (said once: the
        caller steps eagerly)."""
        if _FAILED:
            return None
        try:
            if self.runner is None:
                self.runner = _load(self, token, pos, past, self.window)
            out = self.runner(token, pos, past, self.buffers)
        except Exception as e:  # noqa: BLE001 - a compiler missing or failing: the eager step gives the same logits
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            _FAILED.append(reason)
            print(f"zaizai: --compile could not compile the decode step ({reason}); decoding without it. "
                  "It needs a C++ compiler (gcc or clang; MSVC on Windows)", file=sys.stderr)
            return None
        self.steps += 1
        return out
