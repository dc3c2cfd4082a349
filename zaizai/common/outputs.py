"""One rule for every command that writes: a folder knows what it is, and nothing existing is replaced silently.

- A data folder (``zaizai prepare``), a model folder (``zaizai train`` / ``import-hf``) and a Hugging Face folder
  (``export --format hf``) are told apart by the files in them. A command never writes one kind over another,
  not even with ``--overwrite``: preparing data into a model folder would replace its tokenizer.json and the
  model would decode garbage.
- A folder of the right kind, or any existing file, is replaced only with ``--overwrite``.
- A single-file output (GGUF, a picture) never replaces a file that belongs to a data or model folder, nor takes
  the name of one there (a picture called best.safetensors in a model folder would be loaded as its weights).
- A folder or file that cannot be looked at (no permission) is one clear error, not a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ZaizaiError

DATA, MODEL, HF = "data", "model", "hf"

KIND_NAMES = {
    DATA: "数据文件夹 (a data folder made by zaizai prepare)",
    MODEL: "模型文件夹 (a zaizai model folder)",
    HF: "Hugging Face 模型文件夹 (a transformers folder)",
}

# Files whose presence says what a folder is. Checked in this order: a zaizai model folder also holds a
# config.json, an HF folder a tokenizer.json, so the most specific marker wins.
_MARKERS = (
    (MODEL, ("last.safetensors", "best.safetensors")),
    (HF, ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")),
    (DATA, ("meta.json",)),
)

# Files that belong to one of the folders above: a single-file output never replaces them.
_ARTIFACTS = {"meta.json", "tokenizer.json", "tokenizer_config.json", "config.json", "metrics.jsonl",
              "train.bin", "val.bin", "val.jsonl", "generation_config.json"}


def folder_kind(path: str | os.PathLike) -> str | None:
    """``"data"``, ``"model"``, ``"hf"`` or None (absent, empty, or anything else)."""
    path = Path(path)
    if not path.is_dir():
        return None
    for kind, markers in _MARKERS:
        if any((path / name).is_file() for name in markers):
            return kind
    return None


def _unreadable(path: Path, flag: str, error: OSError) -> ZaizaiError:
    reason = error.strerror or type(error).__name__
    return ZaizaiError(f"{flag} {path} 无法读取（{reason}）；请检查权限或换一个 {flag} · cannot be read ({reason}); "
                       f"check its permissions or choose another {flag}")


def check_output_folder(path: str | os.PathLike, kind: str, *, overwrite: bool, flag: str = "--out",
                        allow_same: bool = False) -> None:
    """Raise unless ``kind`` may be written into ``path``: absent or empty is fine; a folder of another kind
    never is; a folder of the same kind needs ``overwrite`` (or ``allow_same``, e.g. resuming a run); any other
    non-empty folder needs ``overwrite``; one that cannot be listed is an error. Checks only; writes nothing."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ZaizaiError(f"{flag} {path} 是一个文件，请给一个文件夹 · is a file; give a folder")
        if not path.is_dir() or not any(path.iterdir()):
            return
        found = folder_kind(path)
    except OSError as e:  # no permission to list or look inside it
        raise _unreadable(path, flag, e) from None
    if found is not None and found != kind:
        raise ZaizaiError(f"{flag} {path} 已是{KIND_NAMES[found]}，不能写入{KIND_NAMES[kind]}；请换一个 {flag} · "
                          f"{path} already is a {found} folder; writing a {kind} folder there would break it, "
                          f"so choose another {flag}")
    if found == kind and allow_same:
        return
    if not overwrite:
        what = KIND_NAMES[found] if found else "非空文件夹 (a non-empty folder)"
        raise ZaizaiError(f"{flag} {path} 已存在（{what}）；加 --overwrite 覆盖，或换一个 {flag} · "
                          f"{path} already exists; add --overwrite to replace it or choose another {flag}")


def check_output_file(path: str | os.PathLike, *, overwrite: bool, flag: str = "--to",
                      suffixes: tuple[str, ...] = ()) -> None:
    """Raise unless a single file may be written at ``path``: never over a folder or a data/model/HF folder's
    own file (its weights, tokenizer, config); an existing file only with ``overwrite``. ``suffixes``, when
    given, are the endings an existing file must have to be replaced at all (``(".gguf",)``)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ZaizaiError(f"{flag} {path} 是一个文件夹，请给文件路径 · is a folder; give a file path")
        exists, parent_kind = path.exists(), folder_kind(path.parent)
    except OSError as e:
        raise _unreadable(path, flag, e) from None
    # a folder's own file, or one that would pass for it: even a new one (a picture named best.safetensors)
    if parent_kind is not None and (path.name in _ARTIFACTS or path.suffix in (".safetensors", ".bin", ".npy")):
        raise ZaizaiError(f"{flag} {path} 属于{KIND_NAMES[parent_kind]}，不能写；请换一个路径 · "
                          f"{path} belongs to a {parent_kind} folder; choose another path")
    if not exists:
        return
    if suffixes and path.suffix.lower() not in suffixes:
        raise ZaizaiError(f"{flag} {path} 已存在且不是 {'/'.join(suffixes)} 文件，不会覆盖；请换一个路径 · "
                          f"{path} exists and is not a {'/'.join(suffixes)} file; choose another path")
    if not overwrite:
        raise ZaizaiError(f"{flag} {path} 已存在；加 --overwrite 覆盖，或换一个路径 · "
                          f"{path} already exists; add --overwrite to replace it or choose another path")
