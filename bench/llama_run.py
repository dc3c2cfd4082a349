"""llama.cpp (llama-cpp-python) for the benches: load a GGUF file and time greedy generation at batch 1.

    with LlamaRun(path, threads=2) as llm:
        seconds, tokens = llm.generate(prompt_ids, 500)   # the seconds the call took and the 500 new tokens

Both ``bench/gguf_speed.py`` and ``bench/generate_speed.py`` use it. By default llama.cpp runs in a child process
(this file run by the same Python, talking JSON lines over a pipe), so its thread pool and torch's never share
the process: the benches interleave llama.cpp rounds with torch rounds, and two pools of spinning threads in one
process can slow each other. The child times each call itself (``time.perf_counter`` around the generation
only), so the pipe does not count. ``in_process=True`` loads it in this process instead, as the benches once did.

Each call starts from an empty KV cache (``reset``) and takes llama.cpp's greedy sampler (temperature 0, no top-k
/ top-p / min-p / repetition penalty); its KV cache is F16, llama.cpp's default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

N_CTX, N_BATCH = 1024, 512


def load(path: str | os.PathLike, threads: int, n_ctx: int = N_CTX):
    """A ``llama_cpp.Llama`` on ``path`` with ``threads`` threads for both decoding and prompt processing."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=N_BATCH, n_threads=threads, n_threads_batch=threads,
                 verbose=False)


def greedy(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """(seconds, the ``n`` new tokens): greedy, from an empty KV cache, prompt processing included."""
    llm.reset()
    out: list[int] = []
    start = time.perf_counter()
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return time.perf_counter() - start, out


class LlamaRun:
    """llama.cpp on one GGUF file, in a child process (default) or in this one (``in_process``)."""

    def __init__(self, path: str | os.PathLike, threads: int, *, n_ctx: int = N_CTX, in_process: bool = False):
        self.llm = self.child = None
        if in_process:
            self.llm = load(path, threads, n_ctx)
            return
        self.child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(path), str(threads),
                                       str(n_ctx)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer()  # loaded (or the child's error, raised here)

    def _answer(self):
        line = self.child.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the llama.cpp child process ended (see its error above)")
        return json.loads(line)

    def generate(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        """(seconds, the ``n`` greedy tokens) of one call (:func:`greedy`), timed where llama.cpp runs."""
        if self.llm is not None:
            return greedy(self.llm, prompt, n)
        self.child.stdin.write(json.dumps([prompt, n]) + "\n")
        self.child.stdin.flush()
        seconds, out = self._answer()
        return seconds, out

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
        if self.child is not None:
            child, self.child = self.child, None
            child.stdin.close()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            child.stdout.close()

    def __enter__(self) -> "LlamaRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(path: str, threads: int, n_ctx: int) -> None:
    """The child: answer one JSON line per ``[prompt, n]`` request until stdin closes. The answers go to the
    original stdout; anything llama.cpp itself prints goes to stderr."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    llm = load(path, threads, n_ctx)
    answers.write("{}\n")
    answers.flush()
    for line in sys.stdin:
        prompt, n = json.loads(line)
        answers.write(json.dumps(greedy(llm, prompt, n)) + "\n")
        answers.flush()
    llm.close()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
