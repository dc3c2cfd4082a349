"""What a person at the terminal sees and does during training: the progress bar, and Ctrl-C."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from .config import TrainConfig


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class ProgressBar:
    """tqdm bar over steps (with --max-iters) or seconds (with --max-time only); shows loss, tok/s and ETA."""

    def __init__(self, cfg: TrainConfig, step: int, elapsed: float, enabled: bool):
        self.by_time = not cfg.max_iters
        self.bar = None
        self.tps = None
        self.enabled = enabled
        if not enabled:
            return
        from tqdm.auto import tqdm

        if self.by_time:
            self.bar = tqdm(total=int(cfg.max_time), initial=int(elapsed), unit="s", desc="训练 train",
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=cfg.max_iters, initial=step, unit="step", desc="训练 train", dynamic_ncols=True)

    def update(self, step: int, elapsed: float, loss: float, tokens_per_second: float, lr: float) -> None:
        if self.bar is None:
            return
        self.tps = tokens_per_second if self.tps is None else 0.9 * self.tps + 0.1 * tokens_per_second
        if self.by_time:
            self.bar.set_postfix_str(f"step {step} · loss {loss:.3f} · {self.tps:,.0f} tok/s", refresh=False)
            self.bar.update(min(elapsed, self.bar.total) - self.bar.n)  # redraws at tqdm's own pace
        else:
            self.bar.set_postfix_str(f"loss {loss:.3f} · {self.tps:,.0f} tok/s · lr {lr:.2e}", refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is None:
            if self.enabled:  # quiet (verbose=False) runs print nothing
                print(text)
        else:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
