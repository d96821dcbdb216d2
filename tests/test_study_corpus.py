"""scripts/build_study_corpus.py, run as a user runs it, on real .deb packages built here with dpkg-deb (no
download: ``--offline`` reads them from the cache folder): the shards are the same bytes on every build, their
sha256 are recorded and checked, a pinned version that is missing or a package whose text changed stops the build
with one line, and the flags that accept them say so."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import zstandard

from data.corpus_text import html_to_text, r_lazyload_vectors, to_documents

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian tools)")

PAGE = """<html><head><title>Nav title</title><style>p {{}}</style></head><body>
<div class="docnav">Prev Next</div><div id="main"><h1>Chapter {n}</h1>
<p>Paragraph one of chapter {n}, long enough to be kept as text of a document in the corpus.
<p>Second paragraph: <b>bold</b> and   spaced words &amp; an entity.</p>
<pre>  indented code line {n}
    deeper</pre><ul><li>item one<li>item two</ul></div></body></html>"""


def b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = alphabet[n % 64] + out
        n //= 64
        if not n:
            return out


def make_deb(tmp: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    root = tmp / f"build-{package}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: test <t@example.org>\n"
        f"Description: test package\n"
    )
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    deb = tmp / "debs" / f"{package}_{version}_all.deb"
    deb.parent.mkdir(exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)  # fmt: skip
    shutil.rmtree(root)
    return deb


def dictd_files(entries: list[str]) -> dict[str, bytes]:
    data, index, offset = b"", [], 0
    for entry in ["00-database-info\n  metadata, never a document\n", *entries]:
        raw = entry.encode() + b"\n"
        index.append(f"{entry.split()[0]}\t{b64(offset)}\t{b64(len(raw))}")
        data, offset = data + raw, offset + len(raw)
    return {
        "usr/share/dictd/t.dict.dz": gzip.compress(data, mtime=0),
        "usr/share/dictd/t.index": ("\n".join(sorted(index)) + "\n").encode(),
    }


def spec(path: Path, docs_version: str = "1.0-1") -> Path:
    path.write_text(json.dumps({
        "description": "test recipe",
        "doc_chars": 300,
        "min_chars": 50,
        "zstd_level": 19,
        "domains": [
            {"name": "manual", "package": "losslab-test-docs", "version": docs_version, "licence": "public domain",
             "reader": "files", "max_mb": 1.0,
             "source": {"glob": ["usr/share/doc/t/*.html", "usr/share/doc/t/*.txt.gz"], "format": "html",
                        "keep_id": "main", "skip": ["docnav"]}},
            {"name": "lexicon", "package": "losslab-test-dict", "version": "2:0.5", "licence": "GPL-2+",
             "reader": "dictd", "max_mb": 0.002,
             "source": {"dict": "usr/share/dictd/t.dict.dz", "index": "usr/share/dictd/t.index"}},
        ],
    }, indent=2))  # fmt: skip
    return path


def build(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts/build_study_corpus.py"), "--offline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def read_shard(path: Path) -> list[dict]:
    with open(path, "rb") as fh:
        return [json.loads(line) for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh))]


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("debs")
    pages = {f"usr/share/doc/t/ch{n}.html": PAGE.format(n=n).encode() for n in range(6)}
    make_deb(tmp, "losslab-test-docs", "1.0-1", pages)
    words = [f"word{i}\n   The meaning of word number {i}, in a sentence or two of definition." for i in range(80)]
    make_deb(tmp, "losslab-test-dict", "2:0.5", dictd_files(words))
    return tmp / "debs"


def test_the_same_shards_byte_for_byte_recorded_and_checked(tmp_path, debs):
    recipe = spec(tmp_path / "recipe.json")
    first = build("--spec", str(recipe), "--cache", str(debs), "--out", str(tmp_path / "a"), "--record")
    assert first.returncode == 0, first.stderr
    recorded = json.loads(recipe.read_text())
    manual, lexicon = recorded["domains"]
    assert len(manual["deb_sha256"]) == 64 and len(manual["shard"]["sha256"]) == 64
    assert lexicon["shard"]["documents"] == len(read_shard(tmp_path / "a/lexicon.jsonl.zst"))

    # the records: Pile format, the domain, the package and its version, text out of the HTML's kept element
    records = read_shard(tmp_path / "a/manual.jsonl.zst")
    assert {r["meta"]["pile_set_name"] for r in records} == {"manual"}
    assert records[0]["meta"]["package"] == "losslab-test-docs=1.0-1"
    assert records[0]["meta"]["source"] == "usr/share/doc/t/ch0.html#0"
    text = "\n\n".join(r["text"] for r in records)
    assert "Prev Next" not in text and "Nav title" not in text and "p {}" not in text
    assert "Chapter 3\n\nParagraph one of chapter 3" in text
    assert "bold and spaced words & an entity." in text and "  indented code line 3\n    deeper" in text
    # dictionary entries: never the metadata, capped by the recipe's max_mb (2,000 bytes of text)
    lex = read_shard(tmp_path / "a/lexicon.jsonl.zst")
    assert "00-database" not in json.dumps(lex)
    assert 2000 <= sum(len(r["text"].encode()) for r in lex) < 2000 + 400 and len(lex) < 80 / 3

    # a second build elsewhere: the same bytes, checked against the recipe
    second = build("--spec", str(recipe), "--cache", str(debs), "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    for name in ("manual", "lexicon"):
        assert (tmp_path / f"a/{name}.jsonl.zst").read_bytes() == (tmp_path / f"b/{name}.jsonl.zst").read_bytes()
    assert "manual" in second.stdout and "as recorded" in second.stdout
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert manifest["accepted_differences"] == [] and manifest["domains"]["lexicon"]["status"] == "as recorded"

    # shards already there and intact are kept without a rebuild; a damaged one is rebuilt
    shard = tmp_path / "b/manual.jsonl.zst"
    shard.write_bytes(shard.read_bytes()[:-3])
    third = build("--spec", str(recipe), "--cache", str(debs), "--out", str(tmp_path / "b"))
    assert third.returncode == 0, third.stderr
    assert "manual                 building from" in third.stdout
    assert "lexicon                building" not in third.stdout
    assert shard.read_bytes() == (tmp_path / "a/manual.jsonl.zst").read_bytes()


def test_a_changed_package_or_a_missing_pin_stops_the_build_unless_accepted(tmp_path, debs):
    recipe = spec(tmp_path / "recipe.json")
    assert build("--spec", str(recipe), "--cache", str(debs), "--out", str(tmp_path / "a"), "--record").returncode == 0

    # the pinned version is not in the cache (nor, offline, fetchable): one line naming it, exit 2
    older = tmp_path / "older"
    older.mkdir()
    shutil.copy(debs / "losslab-test-dict_2:0.5_all.deb", older)
    pages = {f"usr/share/doc/t/ch{n}.html": PAGE.format(n=f"{n}, older edition").encode() for n in range(6)}
    shutil.copy(make_deb(tmp_path, "losslab-test-docs", "0.9-1", pages), older)
    proc = build("--spec", str(recipe), "--cache", str(older), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "losslab-test-docs=1.0-1" in proc.stderr and "0.9-1 (--accept-other-versions)" in proc.stderr

    # another version accepted: said so; its text differs from the recorded: refused, the shard removed
    proc = build("--spec", str(recipe), "--cache", str(older), "--out", str(tmp_path / "b"), "--accept-other-versions")
    assert proc.returncode == 2, proc.stdout
    assert "pinned 1.0-1 not available, using 0.9-1" in proc.stderr
    assert "manual.jsonl.zst: its text differs from the recipe's" in proc.stderr
    assert "built from losslab-test-docs 0.9-1" in proc.stderr
    assert not (tmp_path / "b/manual.jsonl.zst").exists()  # never left where a study would read it

    # ... and kept with --accept-changed, which the output and the manifest say
    proc = build("--spec", str(recipe), "--cache", str(older), "--out", str(tmp_path / "b"),
                 "--accept-other-versions", "--accept-changed")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "accepted shards that differ from the recipe: manual" in proc.stdout
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert manifest["accepted_differences"] == ["manual"]
    assert manifest["domains"]["manual"]["version"] == "0.9-1"
    assert manifest["domains"]["manual"]["pinned_version"] == "1.0-1"
    assert "older edition" in read_shard(tmp_path / "b/manual.jsonl.zst")[0]["text"]

    # a .deb whose bytes are not the recorded ones (same name and version): one line, exit 2
    tampered = tmp_path / "tampered"
    shutil.copytree(debs, tampered)
    make_deb(tmp_path, "losslab-test-dict", "2:0.5", dictd_files(["other\n   Another dictionary entirely."]))
    shutil.copy(tmp_path / "debs/losslab-test-dict_2:0.5_all.deb", tampered / "losslab-test-dict_2:0.5_all.deb")
    proc = build("--spec", str(recipe), "--cache", str(tampered), "--out", str(tmp_path / "c"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is not the recorded" in proc.stderr and "losslab-test-dict=2:0.5" in proc.stderr


def test_a_bad_recipe_is_one_line(tmp_path, debs):
    recipe = spec(tmp_path / "recipe.json")
    data = json.loads(recipe.read_text())
    data["domains"][1]["reader"] = "pdf"
    recipe.write_text(json.dumps(data))
    proc = build("--spec", str(recipe), "--cache", str(debs), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "reader must be one of" in proc.stderr


def test_documents_are_cut_at_paragraphs_to_about_one_size():
    paras = [f"paragraph {i} " + "x" * (40 + i % 50) for i in range(200)]
    docs = to_documents(paras, 1000)
    assert "\n\n".join(docs) == "\n\n".join(paras)  # nothing lost, nothing reordered
    assert all(len(d) >= 1000 for d in docs[:-1]) and all(len(d) < 1000 + 100 for d in docs[:-1])
    assert len(docs[-1]) >= 1000 // 4
    # a paragraph longer than twice the size is cut at line breaks
    long = "\n".join(f"line {i} " + "y" * 60 for i in range(100))
    cut = to_documents([long], 300)
    assert len(cut) > 5 and all(len(d) <= 2 * 300 + 70 for d in cut) and "\n\n".join(cut).replace("\n\n", "\n") == long
    assert html_to_text("<p>a<p>b</p>") == "a\n\nb"


def _r_data_base(values: dict[str, list[str | None]]) -> tuple[bytes, bytes]:
    """An R lazy-load data base written here in R's XDR serialisation: the .rdx index and the .rdb objects."""
    header = b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8"

    def charsxp(s: str | None) -> bytes:
        raw = (s or "").encode()
        return struct.pack(">ii", 0x9, -1) if s is None else struct.pack(">ii", 0x40009, len(raw)) + raw

    def strsxp(items: list[str | None]) -> bytes:
        return struct.pack(">ii", 16, len(items)) + b"".join(charsxp(s) for s in items)

    def named_list(items: list[bytes], names: list[str]) -> bytes:  # VECSXP with a names attribute (pair list)
        attr = struct.pack(">ii", 0x402, 1) + charsxp("names") + strsxp(names) + struct.pack(">i", 254)
        return struct.pack(">ii", 0x213, len(items)) + b"".join(items) + attr

    rdb, spans = b"", []
    for items in values.values():
        body = header + strsxp(items)
        obj = struct.pack(">i", len(body)) + zlib.compress(body)
        spans.append(struct.pack(">iiii", 13, 2, len(rdb), len(obj)))  # INTSXP c(offset, length)
        rdb += obj
    index = header + named_list([named_list(spans, list(values))], ["variables"])
    return gzip.compress(index, mtime=0), rdb


def test_r_lazyload_character_vectors(tmp_path):
    rdx, rdb = _r_data_base({"novel": ["CHAPTER 1", "", "It was a dark night.", None], "poem": ["one line"]})
    (tmp_path / "Rdata.rdx").write_bytes(rdx)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    assert r_lazyload_vectors(tmp_path) == {
        "novel": ["CHAPTER 1", "", "It was a dark night.", None],
        "poem": ["one line"],
    }
