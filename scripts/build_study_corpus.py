"""Build the studies' corpus from public Debian packages, the same bytes on every machine:

    python scripts/build_study_corpus.py --out corpus/study

One Pile-format shard per domain (``OUT/<domain>.jsonl.zst``: ``{"text": ..., "meta": {"pile_set_name": ...}}``
a line) from English text that Debian ships: dictionaries, a lexical database, a hacker lexicon, essays, Jane
Austen's novels, a Bible translation, books and specifications about Debian and a programming reference. The
recipe is ``configs/data/study_corpus.json``: each domain's package, pinned version, licence, the .deb's sha256,
which files are read and how, and the sha256 of the shard that recipe gave when it was recorded.

Steps, per domain: the pinned ``.deb`` is taken from ``--cache`` or fetched into it with ``apt-get download
PKG=VERSION`` (no root needed; the package lists must be there: ``apt-get update``, as root, once on a fresh
machine), its sha256 checked, unpacked with ``dpkg -x``; its files become text (``data/corpus_text.py``), cut
into documents of about ``doc_chars`` characters, at most ``max_mb`` MB a domain (documents chosen by the hash
of their text, then kept in the package's order), serialised with sorted keys and compressed in one zstd frame
at a fixed level: no timestamps, no dependence on the file system's order. Then each shard's sha256 is compared
with the recorded one:

- equal: nothing more to say; a shard already in ``--out`` with the recorded sha256 is kept without a rebuild;
- compressed bytes differ but the uncompressed JSON lines are the recorded ones (another zstd library): a note,
  the shard is used (training reads the same text);
- the text differs: an error naming the shard, exit 2, the shard removed — unless ``--accept-changed``, which
  keeps it and records the difference in ``OUT/manifest.json`` (a study's report then says so).

A pinned version the mirror no longer serves stops the build with one line naming it (exit 2);
``--accept-other-versions`` takes the version the mirror serves instead, says so, and (the text then differing)
needs ``--accept-changed`` too. ``--offline`` never calls apt: every .deb must be in ``--cache``. ``--record``
(for whoever changes the recipe) writes the built shards' hashes and the .debs' sha256 into the recipe.
``OUT/manifest.json`` says what was built from what.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import zstandard

from data.corpus_text import (
    TextFormatError,
    dictd_entries,
    html_to_text,
    normalise,
    paragraphs,
    r_lazyload_vectors,
    read_text,
    sword_ztext_books,
    to_documents,
    wordnet_glosses,
)
from data.files import file_sha256, write_atomic
from losslab.log import fail, get_logger

log = get_logger(__name__)

BUILDER_VERSION = 1  # bump when the same recipe would give other bytes
DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "configs" / "data" / "study_corpus.json"
READERS = ("files", "dictd", "wordnet", "sword", "r_lazyload")


class BuildError(Exception):
    """One line for the user (exit 2)."""


@dataclass
class Domain:
    name: str
    package: str
    version: str
    licence: str
    reader: str
    source: dict
    max_mb: float
    deb_sha256: str | None = None
    shard: dict = field(default_factory=dict)

    @property
    def shard_file(self) -> str:
        return f"{self.name}.jsonl.zst"


@dataclass
class Spec:
    path: Path
    raw: dict
    doc_chars: int
    min_chars: int
    zstd_level: int
    domains: list[Domain]


def load_spec(path: Path) -> Spec:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"{path}: cannot be read as JSON ({e})") from None
    try:
        domains = []
        for d in raw["domains"]:
            known = {"name", "package", "version", "licence", "reader", "source", "max_mb", "deb_sha256", "shard"}
            unknown = set(d) - known
            if unknown:
                raise BuildError(f"{path}: domain {d.get('name')!r}: unknown key(s) {sorted(unknown)}")
            if d["reader"] not in READERS:
                raise BuildError(f"{path}: domain {d['name']!r}: reader must be one of {READERS}, not {d['reader']!r}")
            if not re.fullmatch(r"[a-z0-9_]+", d["name"]):
                raise BuildError(f"{path}: domain name {d['name']!r}: use lower-case letters, digits and _")
            domains.append(
                Domain(
                    name=d["name"],
                    package=d["package"],
                    version=d["version"],
                    licence=d["licence"],
                    reader=d["reader"],
                    source=dict(d["source"]),
                    max_mb=float(d["max_mb"]),
                    deb_sha256=d.get("deb_sha256"),
                    shard=dict(d.get("shard") or {}),
                )
            )
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise BuildError(f"{path}: domain names repeat")
        return Spec(path, raw, int(raw["doc_chars"]), int(raw["min_chars"]), int(raw["zstd_level"]), domains)
    except KeyError as e:
        raise BuildError(f"{path}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise BuildError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------- packages
def deb_fields(deb: Path) -> tuple[str, str]:
    proc = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{deb}: not a Debian package ({proc.stderr.strip()[:200]})")
    found = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines() if ": " in line)
    return found.get("Package", ""), found.get("Version", "")


def cached_debs(cache: Path) -> dict[tuple[str, str], Path]:
    return {deb_fields(deb): deb for deb in sorted(cache.glob("*.deb"))} if cache.is_dir() else {}


def apt_download(spec: str, cache: Path) -> None:
    """``apt-get download SPEC`` into ``cache``; its error as one line naming the package and what to do."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["apt-get", "download", spec], cwd=cache, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise BuildError("apt-get is not on this machine: copy the .deb files into --cache and use --offline") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"apt-get download {spec}: no answer from the mirror in 15 minutes") from None
    if proc.returncode == 0:
        return
    err = " ".join(line for line in proc.stderr.splitlines() if line.startswith("E:")) or proc.stderr.strip()
    if "was not found" in err and "=" in spec:
        raise VersionNotServed(spec)
    if "Unable to locate package" in err:
        raise BuildError(
            f"apt cannot find package {spec.split('=')[0]}: are the package lists there? (`apt-get update`, as root)"
        )
    raise BuildError(f"apt-get download {spec} failed: {err[:300]}")


class VersionNotServed(BuildError):
    def __init__(self, spec: str) -> None:
        super().__init__(
            f"{spec}: the pinned version is not served by this machine's Debian mirror "
            "(--accept-other-versions takes the version it serves; the shard then differs from the recorded one)"
        )


def fetch_deb(domain: Domain, cache: Path, debs: dict, offline: bool, other_versions: bool) -> tuple[Path, str]:
    """The .deb of ``domain``'s package, pinned version first; (path, version)."""
    pinned = (domain.package, domain.version)
    if pinned not in debs and not offline:
        try:
            apt_download(f"{domain.package}={domain.version}", cache)
        except VersionNotServed:
            if not other_versions:
                raise
            apt_download(domain.package, cache)
        debs.update(cached_debs(cache))
    if pinned in debs:
        deb = debs[pinned]
        if domain.deb_sha256 and file_sha256(deb) != domain.deb_sha256:
            raise BuildError(
                f"{deb}: sha256 {file_sha256(deb)} is not the recorded {domain.deb_sha256} for "
                f"{domain.package}={domain.version} (a damaged download? delete it and run again)"
            )
        return deb, domain.version
    others = sorted(v for (p, v) in debs if p == domain.package)
    if other_versions and others:
        version = others[-1]
        log.warning(f"warning: {domain.package}: pinned {domain.version} not available, using {version}")
        return debs[(domain.package, version)], version
    if offline:
        raise BuildError(
            f"{domain.package}={domain.version}: no such .deb in {cache} (--offline)"
            + (f"; it holds {', '.join(others)} (--accept-other-versions)" if others else "")
        )
    raise VersionNotServed(f"{domain.package}={domain.version}")


# ---------------------------------------------------------------------------------------------------- text
def _files(root: Path, patterns: list[str]) -> list[Path]:
    found = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()}, key=lambda p: str(p))
    if not found:
        raise BuildError(f"{root.name}: no file matches {patterns}")
    return found


def documents_of(domain: Domain, root: Path, doc_chars: int) -> list[tuple[str, str]]:
    """(source id, text) of every document of one unpacked package, in the package's order."""
    src, out = domain.source, []

    def add(source_id: str, paras: list[str], joiner: str = "\n\n") -> None:
        for i, doc in enumerate(to_documents(paras, doc_chars, joiner)):
            out.append((f"{source_id}#{i}", doc))

    if domain.reader == "files":
        for path in _files(root, src["glob"]):
            text = read_text(path)
            if src.get("format", "text") == "html":
                text = html_to_text(text, src.get("keep_id"), src.get("skip", ()))
            add(str(path.relative_to(root)), paragraphs(normalise(text)))
    elif domain.reader == "dictd":
        add(src["dict"], dictd_entries(root / src["dict"], root / src["index"]))
    elif domain.reader == "wordnet":
        for path in _files(root, src["glob"]):
            add(str(path.relative_to(root)), wordnet_glosses(path), joiner="\n")
    elif domain.reader == "sword":
        for block, text in sword_ztext_books(root / src["module"]):
            add(f"{src['module']}/{block}", paragraphs(text))
    elif domain.reader == "r_lazyload":
        for name, lines in r_lazyload_vectors(root / src["data_dir"]).items():
            add(f"{src['data_dir']}/{name}", paragraphs(normalise("\n".join(x or "" for x in lines))))
    return out


def select(docs: list[tuple[str, str]], min_chars: int, max_bytes: int) -> list[tuple[str, str]]:
    """Documents of at least ``min_chars``, exact repeats dropped, at most ``max_bytes`` of text: those whose
    salted text hash is lowest (a spread over the whole package, not its first files), back in the package's
    order. The salt keeps this choice independent of scripts/split_corpus.py, which holds out the documents whose
    plain sha256 is lowest: with the same hash, the capped domains would lose a third of their text to the
    held-out set."""
    seen, kept = set(), []
    for i, (sid, text) in enumerate(docs):
        digest = hashlib.sha256(b"losslab study corpus selection\0" + text.encode("utf-8")).digest()
        if len(text) >= min_chars and digest not in seen:
            seen.add(digest)
            kept.append((digest, i, sid, text))
    chosen, total = [], 0
    for _, i, sid, text in sorted(kept):
        if total >= max_bytes:
            break
        chosen.append((i, sid, text))
        total += len(text.encode("utf-8"))
    return [(sid, text) for _, sid, text in sorted(chosen)]


def shard_bytes(domain: Domain, version: str, docs: list[tuple[str, str]], level: int) -> tuple[bytes, bytes]:
    """(JSON lines, their zstd frame): sorted keys, no ASCII escaping, one frame with size and checksum."""
    lines = []
    for sid, text in docs:
        meta = {
            "pile_set_name": domain.name,
            "package": f"{domain.package}={version}",
            "licence": domain.licence,
            "source": sid,
        }
        lines.append(json.dumps({"meta": meta, "text": text}, ensure_ascii=False, sort_keys=True) + "\n")
    content = "".join(lines).encode("utf-8")
    frame = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(content)
    return content, frame


def content_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
        h = hashlib.sha256()
        for block in iter(lambda: reader.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- build
def build_domain(domain: Domain, spec: Spec, deb: Path, version: str, out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f".unpack-{domain.name}-", dir=out) as tmp:
        proc = subprocess.run(["dpkg", "-x", str(deb), tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"dpkg -x {deb} failed: {proc.stderr.strip()[:300]}")
        try:
            docs = documents_of(domain, Path(tmp), spec.doc_chars)
        except (TextFormatError, OSError, KeyError) as e:
            raise BuildError(f"{domain.name}: {deb.name}: {e}") from None
    docs = select(docs, spec.min_chars, int(domain.max_mb * 1e6))
    if not docs:
        raise BuildError(f"{domain.name}: {deb.name} gave no document of {spec.min_chars} characters or more")
    content, frame = shard_bytes(domain, version, docs, spec.zstd_level)
    path = out / domain.shard_file
    write_atomic(path, frame)
    return {
        "sha256": hashlib.sha256(frame).hexdigest(),
        "content_sha256": hashlib.sha256(content).hexdigest(),
        "documents": len(docs),
        "text_bytes": sum(len(t.encode("utf-8")) for _, t in docs),
    }


def verdict(recorded: dict, built: dict) -> str:
    if not recorded.get("sha256"):
        return "not recorded"
    if recorded["sha256"] == built["sha256"]:
        return "as recorded"
    if recorded.get("content_sha256") == built["content_sha256"]:
        return "content as recorded (compressed bytes differ)"
    return "differs from recorded"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="the recipe (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("corpus/study"))
    parser.add_argument("--cache", type=Path, default=Path("corpus/_downloads/debian"), help=".deb files")
    parser.add_argument("--offline", action="store_true", help="never call apt: the .debs must be in --cache")
    parser.add_argument("--accept-other-versions", action="store_true", help="where a pin is not served: another")
    parser.add_argument("--accept-changed", action="store_true", help="keep shards whose text is not the recipe's")
    parser.add_argument("--record", action="store_true", help="write the shards' and .debs' sha256 into --spec")
    args = parser.parse_args(argv)
    try:
        return build(args)
    except BuildError as e:
        return fail(e)


def build(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()).get("domains", {}) if manifest_path.is_file() else {}
    debs = cached_debs(args.cache)
    report, refused = {}, []
    for domain in spec.domains:
        path = out / domain.shard_file
        recorded = domain.shard
        if path.is_file() and recorded.get("sha256") and file_sha256(path) == recorded["sha256"]:
            report[domain.name] = old.get(domain.name) or {
                "package": domain.package,
                "version": domain.version,
                "licence": domain.licence,
                "shard": domain.shard_file,
                **recorded,
                "status": "as recorded",
            }
            report[domain.name]["status"] = "as recorded"
            print(f"{domain.name:22s} {path} as recorded", flush=True)
            continue
        deb, version = fetch_deb(domain, args.cache, debs, args.offline, args.accept_other_versions)
        print(f"{domain.name:22s} building from {deb.name}", flush=True)
        built = build_domain(domain, spec, deb, version, out)
        status = verdict(recorded, built)
        report[domain.name] = {
            "package": domain.package,
            "version": version,
            **({"pinned_version": domain.version} if version != domain.version else {}),
            "deb_sha256": file_sha256(deb),
            "licence": domain.licence,
            "shard": domain.shard_file,
            **built,
            "status": status,
        }
        print(
            f"{domain.name:22s} {built['documents']:5d} documents {built['text_bytes'] / 1e6:6.2f} MB of text  "
            f"sha256 {built['sha256'][:16]}  {status}",
            flush=True,
        )
        if status == "content as recorded (compressed bytes differ)":
            log.info(
                f"note: {path}: zstandard {zstandard.__version__} compresses otherwise; the text is the recorded one"
            )
        elif status == "differs from recorded" and not (args.accept_changed or args.record):
            refused.append(domain.name)
            path.unlink()
    if refused:
        recorded = {d.name: d.shard.get("sha256", "") for d in spec.domains}
        for name in refused:
            d = report[name]
            other = f", built from {d['package']} {d['version']}" if "pinned_version" in d else ""
            log.error(
                f"error: {out / d['shard']}: its text differs from the recipe's (sha256 {d['sha256'][:16]}..., "
                f"{args.spec} records {recorded[name][:16]}...){other}; shard removed (--accept-changed keeps it)"
            )
        return 2
    if args.record:
        record(spec, report)
        for d in report.values():
            d["status"] = "as recorded"
    accepted = [n for n, d in report.items() if d["status"] == "differs from recorded"]
    manifest = {
        "recipe": args.spec.name,
        "recipe_sha256": file_sha256(args.spec),
        "builder_version": BUILDER_VERSION,
        "zstandard": zstandard.__version__,
        "accepted_differences": accepted,
        "domains": report,
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(d["text_bytes"] for d in report.values())
    docs = sum(d["documents"] for d in report.values())
    print(f"wrote {out}: {len(report)} shards, {docs} documents, {total / 1e6:.1f} MB of text")
    if accepted:
        print(f"NOTE: accepted shards that differ from the recipe: {', '.join(accepted)} (in {manifest_path})")
    return 0


def record(spec: Spec, report: dict) -> None:
    raw = spec.raw
    for d in raw["domains"]:
        r = report[d["name"]]
        d["version"] = r["version"]
        if "deb_sha256" in r:
            d["deb_sha256"] = r["deb_sha256"]
        d["shard"] = {k: r[k] for k in ("sha256", "content_sha256", "documents", "text_bytes")}
    spec.path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    print(f"recorded the shards' sha256 in {spec.path}")


if __name__ == "__main__":
    sys.exit(main())
