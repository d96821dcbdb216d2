"""Plain text out of the files that text-carrying packages ship: HTML pages, dictd dictionaries, WordNet data
files, SWORD Bible modules, R lazy-load databases of character vectors, and (gzipped) text files; and the cut of
long texts into documents of about one size. Every function is a pure function of its input bytes, so a corpus
built from the same packages is the same byte for byte (scripts/build_study_corpus.py).
"""

from __future__ import annotations

import bz2
import gzip
import html.parser
import lzma
import re
import struct
import zlib
from pathlib import Path


class TextFormatError(ValueError):
    """A file is not in the format its reader expects (one line naming the file and what was found)."""


def read_text(path: Path) -> str:
    """A text file, gzipped (``.gz``, dictd's ``.dz`` is gzip-compatible) or not, decoded as UTF-8 (bad bytes
    replaced: the packages' text is UTF-8 or ASCII, and one stray byte must not drop a document)."""
    raw = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def normalise(text: str) -> str:
    """Unix newlines, no control characters but tab and newline, no trailing spaces, at most one blank line."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n"))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------------------------------------------- HTML
class _HtmlText(html.parser.HTMLParser):
    """Text of an HTML page: block elements become line breaks, <pre> keeps its layout, scripts, styles, heads
    and elements with an id or class of ``skip`` (navigation bars, tables of contents) are dropped; with ``keep_id``
    only the element with that id is read. Open elements are a stack (an end tag closes up to its match), so the
    unclosed <p> and <li> of real pages do not leak a skip past its element."""

    SKIP = frozenset({"script", "style", "head", "nav", "noscript", "title", "template"})
    BLOCK = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "section"}
        | {"blockquote", "ul", "ol", "dl", "hr", "article", "header", "footer", "td", "th"}
    )
    PARAGRAPH = frozenset({"p", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "dl", "ul", "ol"})
    VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source", "param"})

    def __init__(self, keep_id: str | None, skip: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.keep_id, self.skip_names = keep_id, skip
        self.stack: list[tuple[str, bool, bool, bool]] = []  # (tag, skipped, kept, pre) for each open element
        self.line_start = True

    def _state(self) -> tuple[bool, bool, bool]:
        return self.stack[-1][1:] if self.stack else (False, self.keep_id is None, False)

    def _break(self, tag: str) -> None:
        skipped, kept, _ = self._state()
        if tag in self.BLOCK and kept and not skipped:
            self.parts.append("\n\n" if tag in self.PARAGRAPH else "\n")
            self.line_start = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break(tag)
        if tag in self.VOID:
            return
        a = dict(attrs)
        skipped, kept, pre = self._state()
        names = {a.get("id") or ""} | set((a.get("class") or "").split())
        skipped = skipped or tag in self.SKIP or bool(names & self.skip_names)
        kept = kept or (self.keep_id is not None and a.get("id") == self.keep_id)
        self.stack.append((tag, skipped, kept, pre or tag == "pre"))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        else:
            return  # an end tag with no open element: ignored, as browsers do
        self._break(tag)

    def handle_data(self, data: str) -> None:
        skipped, kept, pre = self._state()
        if skipped or not kept:
            return
        if not pre:
            data = re.sub(r"\s+", " ", data)
            if self.line_start:
                data = data.lstrip()
        if data:
            self.parts.append(data)
            self.line_start = data.endswith("\n")


def html_to_text(page: str, keep_id: str | None = None, skip: list[str] | tuple[str, ...] = ()) -> str:
    parser = _HtmlText(keep_id, frozenset(skip))
    parser.feed(page)
    parser.close()
    return normalise("".join(parser.parts))


# ---------------------------------------------------------------------------------------------------- dictd
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd_entries(dict_file: Path, index_file: Path) -> list[str]:
    """The entries of a dictd dictionary in the order of the data file: the index gives each headword's offset
    and length (dictd's base-64 numbers); entries several headwords share appear once, and the ``00-database-*``
    entries (the dictionary's own metadata) are left out."""
    data = gzip.decompress(dict_file.read_bytes()) if dict_file.suffix == ".dz" else dict_file.read_bytes()
    spans = set()
    for line in index_file.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00-database") or fields[0].startswith("00database"):
            continue
        try:
            spans.add((_b64_number(fields[1]), _b64_number(fields[2])))
        except KeyError:
            raise TextFormatError(f"{index_file}: not a dictd index (line {line[:60]!r})") from None
    if not spans:
        raise TextFormatError(f"{index_file}: no entries")
    return [normalise(data[o : o + n].decode("utf-8", errors="replace")) for o, n in sorted(spans)]


# ---------------------------------------------------------------------------------------------------- WordNet
def wordnet_glosses(data_file: Path) -> list[str]:
    """``lemma, lemma: gloss`` for every synset of a WordNet 3.0 ``data.*`` file (the licence header lines start
    with two spaces; a synset line holds its words, then ``|`` and the gloss)."""
    out = []
    for line in data_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        fields = line.split(" ")
        try:
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        except (IndexError, ValueError):
            raise TextFormatError(f"{data_file}: not a WordNet data file (line {line[:60]!r})") from None
        out.append(f"{', '.join(words)}: {line.split(' | ', 1)[1].strip()}")
    return out


# ---------------------------------------------------------------------------------------------------- SWORD
def _osis_to_text(block: str) -> str:
    block = re.sub(r"<note[^>]*>.*?</note>", "", block, flags=re.S)  # footnotes and cross-references
    block = re.sub(r"<title[^>]*>(.*?)</title>", r"\n\n\1\n\n", block, flags=re.S)
    block = re.sub(r'<(?:div|chapter)[^>]*\bsID="[^"]*"[^>]*/>', "\n\n", block)  # paragraph and chapter starts
    block = re.sub(r"<l\b[^>]*/?>", "\n", block)  # poetry lines
    block = re.sub(r"<[^>]+>", "", block)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in html.unescape(block).split("\n")]
    return normalise("\n".join(lines))


def sword_ztext_books(module_dir: Path) -> list[tuple[str, str]]:
    """(testament#block, text) for every block of a SWORD zText module compressed with zlib (BlockType=BOOK:
    one block a book), OSIS markup removed: footnotes dropped, paragraphs and titles kept as line breaks."""
    out = []
    for testament in ("ot", "nt"):
        bzs_path, bzz_path = module_dir / f"{testament}.bzs", module_dir / f"{testament}.bzz"
        if not bzs_path.is_file():
            continue
        bzs, bzz = bzs_path.read_bytes(), bzz_path.read_bytes()
        for i in range(0, len(bzs) - 11, 12):
            offset, size, _ = struct.unpack("<III", bzs[i : i + 12])
            if size:
                try:
                    raw = zlib.decompress(bzz[offset : offset + size]).decode("utf-8", errors="replace")
                except zlib.error as e:
                    raise TextFormatError(f"{bzz_path}: block {i // 12} is not zlib data ({e})") from None
                out.append((f"{testament}#{i // 12}", _osis_to_text(raw)))
    if not out:
        raise TextFormatError(f"{module_dir}: no ot/nt .bzs/.bzz files")
    return out


# ---------------------------------------------------------------------------------------------------- R data
class _XdrReader:
    """R's XDR serialisation (R Internals, "Serialization Formats"), only as far as data sets of character
    vectors need: NULL, symbols, pair lists, character, logical, integer, real and generic vectors, with
    attributes and back-references. Anything else is refused, naming the type."""

    def __init__(self, raw: bytes, name: str) -> None:
        self.raw, self.pos, self.name, self.refs = raw, 0, name, []

    def int(self) -> int:
        (v,) = struct.unpack(">i", self.raw[self.pos : self.pos + 4])
        self.pos += 4
        return v

    def read(self):
        if self.raw[:2] != b"X\n":
            raise TextFormatError(f"{self.name}: not R's XDR serialisation")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # the writer's R version and the oldest that reads it
        if version == 3:
            n = self.int()  # the native encoding's name
            self.pos += n
        return self.item()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: the index is in the upper bits, or in the next integer
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP: a CHARSXP, remembered for back-references
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind in (2, 17):  # LISTSXP (pair list) -> {tag: value}, attributes before the tag
            out = {}
            while kind in (2, 17):
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else str(len(out))
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != 254:
                raise TextFormatError(f"{self.name}: pair list ends in type {kind}")
            return out
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            text = self.raw[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        n = self.int()
        if n < 0:
            raise TextFormatError(f"{self.name}: long vectors are not read")
        if kind in (10, 13):  # logical, integer
            value = list(struct.unpack(f">{n}i", self.raw[self.pos : self.pos + 4 * n]))
            self.pos += 4 * n
        elif kind == 14:  # real
            value = list(struct.unpack(f">{n}d", self.raw[self.pos : self.pos + 8 * n]))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            value = [self.item() for _ in range(n)]
        else:
            raise TextFormatError(f"{self.name}: R type {kind} is not read (only data of vectors)")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == 19 and isinstance(names, list):
                if len(names) != len(value):
                    raise TextFormatError(f"{self.name}: a list with {len(value)} items and {len(names)} names")
                return dict(zip(names, value, strict=True))
        return value


def _unserialize(raw: bytes, name: str):
    return _XdrReader(raw, name).read()


def r_lazyload_vectors(data_dir: Path, base: str = "Rdata") -> dict[str, list[str | None]]:
    """The character vectors of an R package's lazy-load data base (``data/Rdata.rdx`` + ``.rdb``): the index is
    a gzipped serialised list (``variables``: name -> (offset, length) in the .rdb); each object is a big-endian
    length and its compressed serialisation (zlib, or a type byte 'Z'/'2'/'X' for zlib/bzip2/xz)."""
    index_path, db_path = data_dir / f"{base}.rdx", data_dir / f"{base}.rdb"
    index = _unserialize(gzip.decompress(index_path.read_bytes()), str(index_path))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise TextFormatError(f"{index_path}: no 'variables' in the lazy-load index")
    db = db_path.read_bytes()
    out = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        blob = db[int(offset) : int(offset) + int(length)]
        kind = blob[4:5]
        unpack = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}.get(kind)
        raw = unpack(blob[5:]) if unpack else zlib.decompress(blob[4:])
        value = _unserialize(raw, f"{db_path}:{name}")
        if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------- documents
def split_long(paragraph: str, limit: int) -> list[str]:
    """A paragraph longer than ``limit`` cut at line breaks (a line longer than ``limit`` stays whole)."""
    if len(paragraph) <= limit:
        return [paragraph]
    pieces, current = [], ""
    for line in paragraph.split("\n"):
        if current and len(current) + 1 + len(line) > limit:
            pieces.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    return pieces + ([current] if current else [])


def to_documents(paragraphs: list[str], doc_chars: int, joiner: str = "\n\n") -> list[str]:
    """Paragraphs (or dictionary entries, or glosses) packed in order into documents of at least ``doc_chars``
    characters, joined by ``joiner`` (a last piece shorter than a quarter of that joins the one before): long
    texts become many documents of about one size, so that every domain has enough of them for a held-out set."""
    docs, current, size = [], [], 0
    for para in paragraphs:
        for piece in split_long(para, 2 * doc_chars):
            size += len(piece) + (len(joiner) if current else 0)  # the length of joiner.join(current)
            current.append(piece)
            if size >= doc_chars:
                docs.append(joiner.join(current))
                current, size = [], 0
    if current:
        tail = joiner.join(current)
        if docs and len(tail) < doc_chars // 4:
            docs[-1] = f"{docs[-1]}{joiner}{tail}"
        else:
            docs.append(tail)
    return docs


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]
