"""Threads that survive a busy machine: a run that did not choose uses no more threads than there are idle cores."""

import torch

import zaizai.common.device as device


def test_default_threads_leave_out_the_cores_other_programs_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(device, "idle_cpus", lambda: 1.05)  # another CPU-bound program on one of two cores
    assert device.default_threads() == 1
    monkeypatch.setattr(device, "idle_cpus", lambda: 1.8)  # an idle machine, a little background noise
    assert device.default_threads() == 2
    monkeypatch.setattr(device, "idle_cpus", lambda: 0.1)  # everything busy: still one thread
    assert device.default_threads() == 1
    monkeypatch.setattr(device, "idle_cpus", lambda: None)  # no /proc/stat: PyTorch's default
    assert device.default_threads() == 2


def test_an_explicit_omp_num_threads_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(device, "idle_cpus", lambda: 0.5)
    assert device.default_threads() == 2


def test_idle_cpus_reads_this_machine():
    idle = device.idle_cpus(0.05)
    assert idle is None or 0.0 <= idle <= (__import__("os").cpu_count() or 1) + 1e-9


def test_the_demo_corpus_leaves_out_what_a_first_time_user_should_not_meet():
    from zaizai.demo import SKIPPED_WORDS, demo_dialogues

    text = "\n".join(m["content"] for conv in demo_dialogues() for m in conv)
    assert not [word for word in SKIPPED_WORDS + ("共产主义", "第二修正案") if word in text]
    assert "我是崽崽" in text and "你好" in text and len(text) > 8000  # still a corpus worth training on


def test_this_process_spinning_does_not_count_as_another_program():
    import threading
    import time

    quiet = device.idle_cpus(0.3)
    if quiet is None:
        return  # no /proc/stat here
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.05)
    try:
        spinning = device.idle_cpus(0.3)
    finally:
        stop.set()
        thread.join()
    # Our own busy thread must not make the cores look taken (other programs' load, e.g. a parallel test worker,
    # is the same in both samples, give or take).
    assert spinning > quiet - 0.5
