"""Reading the user's text (encodings, BOMs, line endings, folders) and splitting documents."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zaizai.data.corpus import decode_counting, list_text_files, read_texts, split_documents
from zaizai.common.errors import ZaizaiError


def _read_one(path: Path, encoding: str = "utf-8") -> str:
    ((read_path, text),) = read_texts([path], encoding=encoding)
    assert read_path == path
    return text


# -- encodings and line endings ----------------------------------------------------------------


def test_utf8_bom_is_stripped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(codecs.BOM_UTF8 + "你好\n".encode())
    assert _read_one(path) == "你好\n"


def test_crlf_and_lone_cr_become_lf(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("一\r\n二\r三\n四\r\n\r\n五".encode())
    assert _read_one(path) == "一\n二\n三\n四\n\n五"


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_with_bom_is_read_by_default(tmp_path, codec):
    # What Windows Notepad writes when saving as "Unicode".
    bom = codecs.BOM_UTF16_LE if codec == "utf-16-le" else codecs.BOM_UTF16_BE
    path = tmp_path / "notepad.txt"
    path.write_bytes(bom + "你好，崽崽\r\n再见\r\n".encode(codec))
    assert _read_one(path) == "你好，崽崽\n再见\n"


def test_non_utf8_file_is_refused_with_name_offset_and_hint(tmp_path):
    path = tmp_path / "ansi.txt"
    path.write_bytes(b"ab" + "你好".encode("gbk"))
    with pytest.raises(ZaizaiError) as err:
        read_texts([path])
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert "not valid UTF-8 at byte 2" in message
    assert "--encoding gbk" in message
    assert "--errors replace" in message


def test_byte_offset_counts_the_utf8_bom(tmp_path):
    path = tmp_path / "bom_then_gbk.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"abc" + "好".encode("gbk"))
    with pytest.raises(ZaizaiError, match="at byte 6;"):
        read_texts([path])


def test_utf16_without_bom_gets_a_utf16_hint(tmp_path):
    path = tmp_path / "no_bom.txt"
    path.write_bytes("hello，你好".encode("utf-16-le"))
    with pytest.raises(ZaizaiError, match="--encoding utf-16"):
        read_texts([path])


def test_encoding_gbk_decodes_gbk(tmp_path):
    path = tmp_path / "gbk.txt"
    original = "床前明月光，疑是地上霜。\r\n举头望明月，低头思故乡。\r\n"
    path.write_bytes(original.encode("gbk"))
    assert _read_one(path, encoding="gbk") == original.replace("\r\n", "\n")


def test_wrong_explicit_encoding_is_refused_with_hint(tmp_path):
    path = tmp_path / "utf8.txt"
    path.write_bytes(b"ok" + b"\xff\xff")
    with pytest.raises(ZaizaiError, match=r"not valid gbk at byte 2; check --encoding"):
        read_texts([path], encoding="gbk")


# A file cut inside its last character: "好" is 3 bytes in UTF-8, 2 in GBK, 2 in UTF-16.
_TRUNCATED = {
    "utf-8": ("你好\n\n早上好".encode()[:-1], len("你好\n\n早上".encode())),
    "utf-8-bom": (codecs.BOM_UTF8 + "你好\n\n早上好".encode()[:-2], len(codecs.BOM_UTF8 + "你好\n\n早上".encode())),
    "gbk": ("你好\n\n早上好".encode("gbk")[:-1], len("你好\n\n早上".encode("gbk"))),
    "utf-16": ("你好\n\n早上好".encode("utf-16")[:-1], len("你好\n\n早上".encode("utf-16"))),
}


@pytest.mark.parametrize("kind", sorted(_TRUNCATED))
def test_file_cut_inside_its_last_character_is_named_as_such(tmp_path, kind):
    raw, offset = _TRUNCATED[kind]
    path = tmp_path / "cut.txt"
    path.write_bytes(raw)
    encoding = "gbk" if kind == "gbk" else "utf-8"
    with pytest.raises(ZaizaiError) as err:
        read_texts([path], encoding=encoding)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: the file ends in the middle of a character at byte {offset} (truncated?)")
    assert "--errors replace" in message and "--errors ignore" in message
    assert "gbk" not in message and "not valid" not in message
    ((_, replaced),) = read_texts([path], encoding=encoding, errors="replace")
    assert replaced == "你好\n\n早上\ufffd"
    ((_, ignored),) = read_texts([path], encoding=encoding, errors="ignore")
    assert ignored == "你好\n\n早上"


def test_bad_bytes_in_the_middle_are_replaced_or_dropped_and_counted(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("一\r\n".encode() + b"\xff" + "二\r\n".encode("gbk") + "三\ufffd".encode())
    with pytest.raises(ZaizaiError, match=r"not valid UTF-8 at byte 5; .*--encoding gbk.*--errors replace"):
        read_texts([path])
    raw = path.read_bytes()
    # a U+FFFD in the file itself is text, not an undecodable character
    assert decode_counting(raw, errors="replace") == ("一\n\ufffd\ufffd\ufffd\n三\ufffd", 3, 0)
    assert decode_counting(raw, errors="ignore") == ("一\n\n三\ufffd", 3, 0)
    assert decode_counting("三".encode(), errors="replace") == ("三", 0, 0)


def test_unknown_errors_value_is_refused(tiny_corpus):
    with pytest.raises(ZaizaiError, match="--errors must be one of strict, replace, ignore, got 'skip'"):
        read_texts([tiny_corpus], errors="skip")


@pytest.mark.parametrize("encoding", ["klingon", "base64"])
def test_unknown_encoding_is_refused(tmp_path, encoding, tiny_corpus):
    with pytest.raises(ZaizaiError, match=f"unknown text encoding '{encoding}'; use a name such as"):
        read_texts([tiny_corpus], encoding=encoding)


def test_encoding_names_are_normalised(tiny_corpus):
    assert _read_one(tiny_corpus, encoding="UTF8") == _read_one(tiny_corpus)


# -- paths -------------------------------------------------------------------------------------


def test_folder_reads_every_txt_recursively_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "c.txt").write_text("c", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not text input", encoding="utf-8")
    texts = read_texts([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p, _ in texts] == ["a.txt", "b/z.txt", "c.txt"]
    assert [text for _, text in texts] == ["a", "z", "c"]


def test_a_single_path_and_repeated_paths(tmp_path, tiny_corpus):
    assert list_text_files(tiny_corpus) == [tiny_corpus]
    assert list_text_files([tiny_corpus, tmp_path]) == [tiny_corpus]  # read once


def test_missing_path_is_refused(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ZaizaiError, match=f"{missing}: no such file or folder"):
        read_texts([missing])


def test_folder_without_txt_is_refused(tmp_path):
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="folder has no .txt files"):
        read_texts([tmp_path])


def test_no_paths_is_refused():
    with pytest.raises(ZaizaiError, match="no input files given"):
        read_texts([])


def test_reading_never_modifies_the_files(tmp_path):
    path = tmp_path / "crlf.txt"
    raw = codecs.BOM_UTF8 + "一\r\n二\r\n".encode()
    path.write_bytes(raw)
    before = path.stat().st_mtime_ns
    read_texts([path])
    assert path.read_bytes() == raw
    assert path.stat().st_mtime_ns == before


# -- documents ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "documents"),
    [
        ("", []),
        ("  \n\t\n\u3000\n", []),
        ("一\n二", ["一\n二"]),
        ("一\n二\n\n三\n", ["一\n二", "三"]),
        ("\n\n\n一\n\n\n\n二\n\n\n", ["一", "二"]),  # several blank lines count as one
        ("一\n  \t \n二", ["一", "二"]),  # whitespace-only lines are blank
        ("一\n\u3000\u3000\n二", ["一", "二"]),  # so are full-width spaces
        ("  一  \n\u3000\u3000二\n\n三", ["  一  \n\u3000\u3000二", "三"]),  # line spacing kept
        ("一\n   ", ["一"]),  # a trailing whitespace-only line without newline
    ],
)
def test_split_documents(text, documents):
    assert split_documents(text) == documents


def _split_documents_line_by_line(text: str) -> list[str]:
    """The obvious reference: group consecutive non-blank lines."""
    documents, block = [], []
    for line in text.split("\n"):
        if line.strip():
            block.append(line)
        elif block:
            documents.append("\n".join(block))
            block = []
    if block:
        documents.append("\n".join(block))
    return documents


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["甲", "b", " ", "\t", "\u3000", "\n", "\x0b", "\x85"])))
def test_split_documents_matches_the_line_by_line_reference(text):
    assert split_documents(text) == _split_documents_line_by_line(text)
