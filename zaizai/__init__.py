"""zaizai (崽崽): train a GPT-2-style model on your own Chinese text, then talk to it.

Library use::

    import zaizai
    zaizai.prepare(["poems.txt"], "data/")            # text -> tokenizer + token bins
    zaizai.train("data/", "out/", max_time=300)       # train, checkpoints in out/
    bot = zaizai.load("out/")
    print(bot.generate("床前", max_new_tokens=50))
"""

__version__ = "0.1.0"

from .common.errors import ZaizaiError  # noqa: E402


def __getattr__(name):
    # Import lazily so `import zaizai` (and `zaizai --help`) stays quick.
    if name == "prepare":
        from .data.preparation import prepare
        return prepare
    if name == "train":
        from .training.loop import train
        return train
    if name == "load":
        from .inference.loaded import load
        return load
    raise AttributeError(f"module 'zaizai' has no attribute {name!r}")


__all__ = ["ZaizaiError", "prepare", "train", "load", "__version__"]
