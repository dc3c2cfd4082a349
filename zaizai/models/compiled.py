"""A decode step for one sequence compiled ahead of time (torch.export, then AOTInductor): ``--compile`` on CPU.

At batch 1 a decode step reads every weight once and does little arithmetic with it, so its time is the weights'
read from memory plus the cost of each operation launched. The eager step (:mod:`zaizai.models.decode`) launches
~15 library calls a layer, and oneDNN's matrix-vector products read fp32 weights at ~15 GB/s on the 2-core AMD
EPYC this project measures on, where a plain ``sum()`` over the same weights reads 23 GB/s. Here the whole step,
every layer and the output layer, is one function of the new token, its position and the cache;
Inductor fuses it into C++ loops, each product written as ``(W * x).sum(-1)``: a reduction over each weight row,
read once, in order (6L/384d, the 25 products alone: 2.7 ms against oneDNN's 3.8; ``bench/generate_speed.py``
has the whole step). The transposed form, ``(W^T * x[:, None]).sum(0)``, reads 2.7x slower (7.6 GB/s). A step of
several rows stays eager: there each weight is read once for all of them, which this form would not do.

The step takes the decoder's cache rows as they are (each layer's whole keys and values of row 0, block_size
long) and a span whose length is the cache's (a dynamic size, ``torch.export.Dim``: one compilation serves every
length); it writes the new token's keys and values into those rows itself, in place (AOTInductor stores into the
input; the attention then reads them with the rest), and returns the logits with their argmax and whether they are
all finite (what the sampler would otherwise compute in three more tensor operations). So a step's inputs are the
same tensors every time but the span (one of a list made once) and the token (written through a numpy view), and
a token costs the compiled call and nothing else: at 4L/128d every tensor operation around it cost ~5-15 us, the
caches just flushed by the weights' read. The weights are passed as one flat buffer per dtype
(:func:`flat_weights`, made once per model), not ~80 tensors.

Compiled ahead of time, not with ``torch.compile``: a token then costs one call into the package's C++, with no
dynamo guards, no Python wrapper allocating each intermediate buffer, and no per-call pytree lay-out (:func:`_direct`).
In one process, 500 greedy tokens: 1.6x faster at 4L/128d and 1.2-1.3x at 6L/384d than the same step through
``torch.compile``. Compiling takes ~20-30 s; the package (a few MB) is kept in :func:`cache_dir`, one per model
shape, torch version, CPU and thread count, and a later run loads it in well under a second (``torch.compile``
needed a few seconds in every process).

16-bit weights (``--weights float16``, :func:`round_weights`): the model's matrices rounded to float16 or bfloat16,
which the compiled step reads at that size and widens in its loops: half the bytes of a token's read, the
arithmetic still float32 (6L/384d's 25 products: 1.0 ms against 2.4). That is what llama.cpp's F16 file holds.
Keys and values are rounded to 16 bits too; the step reads a 16-bit copy of row 0's cache (:meth:`CompiledStep.rows`)
and writes the new token's into both.

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


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query per head against the cache, the new token's keys and values included: q (nh, hs), already
    scaled; keys, values (nkv, n, hs). Query head h reads key/value head h // (nh / nkv). -> (nh * hs,). The scores
    are a bmm (Inductor turns a one-row bmm into loops of its own; a 16-bit cache widened in them); the values'
    sum is a bmm for an fp32 cache (1.03-1.15x faster at 100-900 tokens of cache than elementwise products and
    sums, 6L/384d) and those products and sums for a 16-bit one (a bmm, or the scores as products and sums, were
    slower: 6L/384d with float16 weights, 1,000 tokens of cache, a whole step 2.1 ms against 2.3 and 3.0)."""
    nkv, n, hs = keys.shape
    q = q.view(nkv, -1, hs)  # (nkv, group, hs)
    att = torch.softmax(torch.bmm(q, keys.float().transpose(1, 2)), dim=-1)  # (nkv, group, n)
    if values.dtype == torch.float32:
        y = torch.bmm(att, values)  # (nkv, group, hs)
    else:
        y = (att.unsqueeze(-1) * values.unsqueeze(1).float()).sum(2)
    return y.reshape(-1)


def as_cached(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Keys or values ``x`` as a cache of ``dtype`` holds them: rounded to it, in x's own type still (None: as is).
    A model with 16-bit weights rounds them to 16 bits, eagerly (the decoder) and compiled alike."""
    return x if dtype is None or dtype == x.dtype else x.to(dtype).to(x.dtype)


def _keep(k: torch.Tensor, v: torch.Tensor, p, rows: tuple, stored: tuple | None) -> tuple:
    """The new token's keys and values k, v (nkv, hs) written at position p of one layer's rows (in place: the
    compiled step writes into the decoder's cache): ``rows``, the (keys, values) (nkv, block_size, hs) the step
    reads, and ``stored``, the decoder's own fp32 ones where the step reads a 16-bit copy (None: the rows are the
    decoder's). -> the rows' first p + 1 (keys, values)."""
    k, v = as_cached(k, rows[0].dtype), as_cached(v, rows[0].dtype)
    for row, new in zip((*rows, *(stored or ())), (k, v, k, v)):
        row.select(1, p).copy_(new)
    return rows[0][:, :p + 1], rows[1][:, :p + 1]


def gpt_step(token: torch.Tensor, p, past: tuple, stored: tuple, weights: tuple, n_head: int, eps: float):
    """GPT-2, one token: token (1,) at position p; past: each layer's (keys, values) rows (nh, block_size, hs) each,
    p tokens in them, and the new token's written at p (stored: see :func:`_keep`, one per layer, or ()) ->
    logits (1, V)."""
    wte, wpe, lnf_w, lnf_b, head, layers = weights
    C = wte.size(1)
    hs = C // n_head
    x = wte[token][0].float() + wpe[p].float()  # (C,)
    for (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b), rows, mine in zip(
            layers, past, stored or (None,) * len(past)):
        q, k, v = _product(F.layer_norm(x, (C,), ln1_w, ln1_b, eps), attn_w, attn_b).view(3, n_head, hs)
        x = x + _product(_attend(q * hs ** -0.5, *_keep(k, v, p, rows, mine)), proj_w, proj_b)
        h = F.gelu(_product(F.layer_norm(x, (C,), ln2_w, ln2_b, eps), fc_w, fc_b), approximate="tanh")
        x = x + _product(h, out_w, out_b)
    return _product(F.layer_norm(x, (C,), lnf_w, lnf_b, eps), head).unsqueeze(0)


def modern_step(token: torch.Tensor, p, past: tuple, stored: tuple, weights: tuple, n_head: int, eps: float):
    """The modern (Qwen3-style) model, one token: as :func:`gpt_step`, the rows (nkv, block_size, hs) each. Each
    layer's ``qk_w`` (nh + nkv, hs) holds the QK-norm weights with the attention scale folded into the queries'
    rows, and the sine table carries RoPE's sign (see :class:`~zaizai.models.decode.ModernDecoder`)."""
    embed, norm_w, head, cos, sin, layers = weights
    C = embed.size(1)
    nkv, _, hs = past[0][0].shape
    cos, sin = cos[p], sin[p]  # (hs,)
    x = embed[token][0].float()  # (C,)
    for (ln1, q_w, k_w, v_w, qk_norm, qk_w, o_w, ln2, gate_w, up_w, down_w), rows, mine in zip(
            layers, past, stored or (None,) * len(past)):
        h = F.rms_norm(x, (C,), ln1, eps)
        qk = torch.cat([_product(h, q_w), _product(h, k_w)]).view(n_head + nkv, hs)
        qk = (F.rms_norm(qk, (hs,), None, eps) if qk_norm else qk) * qk_w
        qk = qk * cos + qk.roll(hs // 2, dims=-1) * sin
        q, k, v = qk[:n_head], qk[n_head:], _product(h, v_w).view(nkv, hs)
        x = x + _product(_attend(q, *_keep(k, v, p, rows, mine)), o_w)
        h = F.rms_norm(x, (C,), ln2, eps)
        x = x + _product(F.silu(_product(h, gate_w)) * _product(h, up_w), down_w)
    return _product(F.rms_norm(x, (C,), norm_w, eps), head).unsqueeze(0)


def _bound(fn, layout, n_head: int, eps: float):
    """``fn`` (:func:`gpt_step` or :func:`modern_step`) of the weights :func:`flatten` laid out as ``layout``, as
    what is compiled: a function of (token (1,), span, past, stored, buffers), where the cache holds p = len(span)
    tokens (span: any tensor that long, whose values are not read), past holds each layer's whole (keys, values)
    rows (nkv, block_size, hs) (stored: see :func:`_keep`), and the new token goes to position p, its keys and
    values written there. -> (logits (1, V), choice): choice (2,) int64 holds the logits' argmax (the greedy
    token) and 1 if they are all finite, else 0. Its inputs stay the same tensors from step to step but the token
    and the span (:meth:`CompiledStep.__call__`)."""
    def step(token, span, past, stored, buffers):
        logits = fn(token, span.shape[0], past, stored, unflatten(buffers, layout), n_head, eps)
        choice = torch.stack([logits[0].argmax(), (logits.abs().amax() < math.inf).long()])  # nan is not < inf
        return logits, choice
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
    it. A tensor named twice (tied embeddings) gives one detached tensor, so :func:`flatten` stores it once."""
    memo = {} if memo is None else memo
    if isinstance(weights, (tuple, list)):
        return tuple(detached(w, dtype, memo) for w in weights)
    if not isinstance(weights, torch.Tensor):
        return weights
    if id(weights) not in memo:
        to_dtype = dtype is not None and isinstance(weights, torch.nn.Parameter) and weights.dim() == 2
        memo[id(weights)] = weights.detach().to(dtype) if to_dtype else weights.detach()
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


def _package_key(step: CompiledStep, past: tuple) -> str:
    """What a compiled step's code depends on, hashed: this module's source, torch, the CPU and thread count,
    the step's function, the model's shape and the dtypes and strides of what it is given."""
    parts = [_machine(), torch.get_num_threads(), step.fn.__name__,
             step.n_head, step.eps, step.layout, [(b.dtype, b.shape) for b in step.buffers], step.kv_dtype,
             step.window, [(t.dtype, t.shape[0], t.shape[2], t.stride()) for kv in past for t in kv], sorted(step.OPTIONS.items())]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


class _Step(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, token, span, past, stored, buffers):
        return self.fn(token, span, past, stored, buffers)


def _build(step: CompiledStep, example: list) -> bytes:
    """The step compiled ahead of time (torch.export, then AOTInductor) for every cache length it takes (the span's
    length; :meth:`CompiledStep.takes`): a .pt2 package's bytes. ``example``: its inputs, as :func:`_flat` lays
    them."""
    p = torch.export.Dim("p", min=step.MIN_PAST, max=step.window - 2)
    token, span, past, stored, buffers = _nest(example, *step.shape)
    dynamic = (None, {0: p}, tuple((None, None) for _ in past), tuple((None, None) for _ in stored),
               tuple(None for _ in buffers))
    package = io.BytesIO()
    with warnings.catch_warnings():  # torch's own deprecation notes about its internals: nothing a user can do
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(_Step(_bound(step.fn, step.layout, step.n_head, step.eps)),
                                      (token, span, past, stored, buffers), dynamic_shapes=dynamic)
        torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=dict(step.OPTIONS))
    return package.getvalue()


def _load(step: CompiledStep, example: list):
    """The compiled step for this model shape, a function of its inputs laid out as :func:`_flat` does: from the
    cache (:func:`cache_dir`), or compiled now and kept there (written atomically, packages unused for KEEP_DAYS days
    deleted; where the cache cannot be written, in a temporary folder for this process)."""
    from ..common.fileio import atomic_write

    key = _package_key(step, _nest(example, *step.shape)[2])
    if key in _COMPILED:
        return _COMPILED[key]
    path = cache_dir() / "compiled" / f"step-{key}.pt2"
    runner = None
    if path.is_file():
        try:
            runner = torch._inductor.aoti_load_package(str(path))
            os.utime(path)  # used now: see _prune
        except Exception:  # noqa: BLE001 - unreadable (another torch, a damaged file): compile it again
            runner = None
    if runner is None:
        data = _build(step, example)
        BUILT.append(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
            _prune(path.parent)
        except OSError:
            path = Path(tempfile.mkdtemp(prefix="zaizai-compiled-")) / path.name
            path.write_bytes(data)
        runner = torch._inductor.aoti_load_package(str(path))
    _COMPILED[key] = _direct(runner, example, step.shape)
    return _COMPILED[key]


KEEP_DAYS = 30  # a package not used for this long is deleted when another is compiled (an old torch's, a model's
# shape no longer used): the folder does not grow for ever


def _prune(folder: Path) -> None:
    """Delete the packages in ``folder`` not used (loaded or written) for KEEP_DAYS days."""
    import time

    for old in folder.glob("step-*.pt2"):
        try:
            if time.time() - old.stat().st_mtime > KEEP_DAYS * 86400:
                old.unlink()
        except OSError:  # another process's, gone already, or not ours to delete: leave it
            pass


def _flat(token: torch.Tensor | None, span: torch.Tensor | None, past, stored, buffers: tuple) -> list:
    """The step's inputs in one list: token, span, each layer's keys and values (past, then stored), the weight
    buffers."""
    flat = [token, span]
    for keys, values in (*past, *stored):
        flat += (keys, values)
    return [*flat, *buffers]


def _nest(flat: list, layers: int, stored: int) -> tuple:
    """:func:`_flat`'s list as the step's arguments again, (token, span, past, stored, buffers), for ``layers``
    layers' rows in past and ``stored`` in stored."""
    mid, end = 2 + 2 * layers, 2 + 2 * (layers + stored)
    pairs = lambda a, b: tuple(zip(flat[a:b:2], flat[a + 1:b:2]))  # noqa: E731
    return flat[0], flat[1], pairs(2, mid), pairs(mid, end), tuple(flat[end:])


def _direct(runner, example: list, shape: tuple[int, int]):
    """``runner`` (a loaded package) as a function of its inputs in :func:`_flat`'s list, which its loader takes as
    they are where torch's pytree lays out the step's arguments in that order (the package's own call lays them
    out at every call: 4L/128d, a quarter of a step's time); else through the runner's own call."""
    from torch.utils import _pytree

    run = getattr(getattr(runner, "loader", None), "boxed_run", None)
    leaves = _pytree.tree_leaves((_nest(example, *shape), {}))
    if run is None or len(leaves) != len(example) or any(a is not b for a, b in zip(leaves, example)):
        return lambda flat: runner(*_nest(flat, *shape))
    return lambda flat: run(list(flat))  # a copy: the loader empties the list it is given


@functools.lru_cache(maxsize=None)
def _spans(window: int) -> list[torch.Tensor]:
    """spans[p] (p < window) is p long: what tells the compiled step a cache's length. Its values are never read."""
    span = torch.empty(window, dtype=torch.int8)
    return [span[:p] for p in range(window)]


class CompiledStep:
    """A decoder's compiled one-sequence step: ``fn`` (:func:`gpt_step` or :func:`modern_step`) on the weights of
    :func:`flat_weights`, and for 16-bit weights the 16-bit copy of row 0's cache it reads."""

    # The cache lengths it takes (tokens before the new one): MIN_PAST .. window - 2. A cache of 0 or 1 token, or
    # one whose rows the new token fills (their first p + 1 are then contiguous), would be compiled again as a
    # special size: the eager step takes those.
    MIN_PAST = 2
    # Inductor's options for this graph: every intermediate kept in a buffer of its own. By default a product's
    # input (an embedding lookup and a layer norm, say) is recomputed inside its loop for each of the weight's
    # rows, which makes the loop compute-bound; these are vectors of a few hundred floats, so keeping them costs
    # nothing (6L/384d: 3.4 vs 4.0 ms a step, interleaved).
    # Casts to 16 bits round as they do eagerly (new keys and values rounded as the cache holds them); by default
    # Inductor drops a down-and-up cast pair in a fused loop.
    OPTIONS = {"realize_opcount_threshold": 0, "emulate_precision_casts": True}

    def __init__(self, fn, flat: tuple, n_head: int, eps: float, window: int, layers: int,
                 kv_dtype: torch.dtype | None = None):
        """``flat``: the weights as :func:`flat_weights` gives them, (buffers, layout). ``window``: the tokens a
        cache row holds (block_size); ``layers``: the model's. ``kv_dtype``: the 16-bit type the decoder rounds
        keys and values to (a model with 16-bit weights): the step then reads a copy of row 0's cache in that type
        (:meth:`rows`), half the bytes."""
        self.fn, self.n_head, self.eps, self.window, self.kv_dtype = fn, n_head, eps, window, kv_dtype
        self.shape = (layers, 0 if kv_dtype is None else layers)  # the layers' rows the step reads, and writes also
        self.buffers, self.layout = flat
        self.runner = None  # the compiled step for this model's shape, found at the first call (which compiles it)
        self.steps = 0  # steps it has run
        self.mirror: torch.Tensor | None = None  # row 0's keys and values in kv_dtype, like the cache's row 0
        self.mirrored = 0  # positions [0, mirrored) of the mirror hold row 0's
        self.source: tuple = (None, None)  # the rows the inputs below hold: (what the step reads, row 0's)
        self.inputs: list = []  # the step's inputs (_flat), the same tensors at every step but the span
        self.spans = _spans(window)  # spans[p]: a cache of p tokens (see _bound)
        self.token = torch.zeros(1, dtype=torch.long)  # the token (CPU: what --compile runs on), written in place
        self.token_ids = self.token.numpy()  # through numpy: a write that is no tensor operation

    def takes(self, p: int) -> bool:
        """Whether it steps after a cache of p tokens (else the eager step does)."""
        return self.MIN_PAST <= p <= self.window - 2

    def rows(self, row0: list, p: int) -> list:
        """What the step reads of row 0's cache, p tokens of it: each layer's (keys, values), ``row0`` (each
        layer's row-0 (keys, values), (heads, block_size, hs) each) or its 16-bit mirror, brought up to date."""
        if self.kv_dtype is None:
            return row0
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
        return self.mirror_rows

    def forget(self) -> None:
        """Row 0 holds another sequence now (a new one, one moved there, or none): the mirror is out of date."""
        self.mirrored = 0

    def __call__(self, token: int, p: int, row0: list):
        """The next token after row 0's p tokens: ``token`` goes to position p. ``row0``: each layer's row-0
        (keys, values), (nkv, block_size, hs) each, views of a decoder's cache whose strides do not depend on how
        many rows it has (a server's cache grows: that must not compile the step again). The token's keys and
        values are written at position p of those rows (and of the mirror). -> (logits (1, V), choice (2,): the
        greedy token, 1 if the logits are finite), or None where compiling failed (said once: the caller steps
        eagerly, and nothing was written)."""
        if _FAILED:
            return None
        try:
            rows = self.rows(row0, p)
            if rows is not self.source[0] or row0 is not self.source[1]:  # the first step, a cache grown
                self.source = (rows, row0)
                self.inputs = _flat(self.token, None, rows, row0 if rows is not row0 else (), self.buffers)
            self.token_ids[0] = token
            self.inputs[1] = self.spans[p]
            if self.runner is None:
                self.runner = _load(self, self.inputs)
            out = self.runner(self.inputs)
        except Exception as e:  # noqa: BLE001 - a compiler missing or failing: the eager step gives the same logits
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            _FAILED.append(reason)
            print(f"zaizai: --compile could not compile the decode step ({reason}); decoding without it. "
                  "It needs a C++ compiler (gcc or clang; MSVC on Windows)", file=sys.stderr)
            return None
        self.steps += 1
        if self.mirror is not None:
            self.mirrored = p + 1
        return out
