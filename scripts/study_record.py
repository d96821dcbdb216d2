"""What a study's report was made from, written beside it (``OUT/provenance.md`` and ``provenance.json``): the
commit of the code that made the report and the commits the runs recorded, the commands, the corpus (its recipe,
the packages and versions it was built from, and any shard accepted although it differs from the recorded
one), the machine, and each run's state. The study drivers (scripts/cpu_study.sh, scripts/finetune_study.sh)
call it after the report:

    python scripts/study_record.py --out DIR --command "bash scripts/cpu_study.sh" \\
        [--corpus corpus/study/manifest.json] [--data FILE ...] RUN_DIR ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.files import file_sha256, git_commit, write_atomic
from losslab.log import fail
from models.checkpoint import PUBLISHED_RECORD


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _shown(path: str) -> str:
    """A path as the reader's clone would have it: relative to the repository when inside it."""
    p = Path(path).resolve()
    root = Path(__file__).resolve().parents[1]
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


COMMIT_KEYS = ("trained_at", "other_launches_at", "evaluated_at")


def _distinct(shas) -> list[str]:
    return list(dict.fromkeys(s for s in shas if s))


def _commits(run: Path, info: dict) -> dict[str, list[str]]:
    """The commits of the code that made a run: the launches that trained its steps, the launches that trained
    none (a relaunch finishing the final evaluation), and the evaluations of its checkpoints (the code that
    evaluated; absent from evaluations made before it was recorded)."""
    launches = info.get("launches") or []
    trained = [x for x in launches if x.get("start_step", 1) <= x.get("max_steps", 0)]
    evaluations = [_json(f) for f in sorted(run.glob("checkpoints/*/evals/*/eval_results.json"))]
    return {
        "trained_at": _distinct(x.get("git_sha") for x in trained) or _distinct([info.get("git_sha")]),
        "other_launches_at": _distinct(x.get("git_sha") for x in launches if x not in trained),
        "evaluated_at": _distinct(e.get("evaluated_at") for e in evaluations),
    }


def collect(args: argparse.Namespace) -> dict:
    import torch

    runs = []
    for run in args.runs:
        result, info = _json(Path(run) / "result.json"), _json(Path(run) / "run_info.json")
        runs.append(
            {
                "run": Path(run).name,
                "trained": bool(result),  # False: a model evaluated, not trained here (the model before fine-tuning)
                "complete": result.get("complete"),
                "steps": result.get("steps"),
                **_commits(Path(run), info),
                # trained by an earlier invocation and published without weights (scripts/publish_runs.py)
                "from_published_record": (Path(run) / PUBLISHED_RECORD).is_file(),
            }
        )
    corpus = _json(Path(args.corpus)) if args.corpus else {}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "report_commit": git_commit(),
        "run_commits": sorted({c for r in runs for k in COMMIT_KEYS for c in r[k]}),
        "commands": args.command,
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "corpus": corpus,
        "data_files": {_shown(f): file_sha256(f) for f in args.data},
        "runs": runs,
        "published": _shown(args.published) if args.published else "",
    }


def markdown(rec: dict) -> str:
    lines = [
        "# Provenance",
        "",
        f"Made {rec['date']} by the code at commit `{rec['report_commit']}`; the runs were made at "
        + (", ".join(f"`{c}`" for c in rec["run_commits"]) or "no recorded commit")
        + " (run by run below).",
        "",
        "Commands:",
        "",
        "```bash",
        *rec["commands"],
        "```",
        "",
        f"Machine: {rec['machine']['cpu']}, {rec['machine']['cores']} cores, torch {rec['machine']['torch']}, "
        f"Python {rec['machine']['python']}.",
    ]
    corpus = rec["corpus"]
    if corpus:
        accepted = corpus.get("accepted_differences") or []
        lines += [
            "",
            f"Corpus: `configs/data/{corpus.get('recipe')}` (sha256 {str(corpus.get('recipe_sha256'))[:16]}...), "
            f"builder version {corpus.get('builder_version')}, zstandard {corpus.get('zstandard')}.",
            "**Shards accepted although their text differs from the recorded one: " + ", ".join(accepted) + ".**"
            if accepted
            else "Every shard is the recorded one (sha256 as in the recipe).",
            "",
            "| domain | package | version | licence | documents | MB of text | shard sha256 | status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, d in sorted(corpus.get("domains", {}).items()):
            version = d.get("version", "")
            if d.get("pinned_version"):
                version += f" (pinned {d['pinned_version']})"
            lines.append(
                f"| {name} | {d.get('package')} | {version} | {d.get('licence')} | {d.get('documents')} | "
                f"{d.get('text_bytes', 0) / 1e6:.2f} | `{str(d.get('sha256'))[:16]}` | {d.get('status')} |"
            )
    if rec["data_files"]:
        lines += ["", "Other inputs:", ""] + [f"- `{f}` sha256 `{h}`" for f, h in rec["data_files"].items()]
    unfinished = [r["run"] for r in rec["runs"] if r["trained"] and not r["complete"]]
    state = f"; **not complete: {', '.join(unfinished)}**" if unfinished else ", all complete"
    lines += ["", f'Runs: {len(rec["runs"])}{state}. The commits of the code that made each ("—": not recorded):']
    lines += ["", "| run | steps | trained at | later launches at (no step trained) | evaluated at |"]
    lines.append("|---|---|---|---|---|")
    for r in rec["runs"]:
        shown = [", ".join(f"`{c[:9]}`" for c in r[k]) or "—" for k in COMMIT_KEYS]
        lines.append(f"| {r['run']} | {r['steps'] if r['trained'] else '(not trained)'} | " + " | ".join(shown) + " |")
    restored = [r["run"] for r in rec["runs"] if r.get("from_published_record")]
    if restored:
        lines += [
            "",
            "Read from their published records (the runs' files without weights, in "
            f"`{rec.get('published') or '?'}`; trained earlier, at the commits above, and not trained again for this "
            "report): " + ", ".join(restored) + ".",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--command", action="append", default=[], help="a command of the study (repeatable)")
    parser.add_argument("--corpus", help="the corpus builder's manifest.json")
    parser.add_argument("--data", nargs="*", default=[], help="other input files to hash")
    parser.add_argument("--published", default="", help="where runs restored from published records came from")
    parser.add_argument("runs", nargs="*")
    args = parser.parse_args(argv)
    # a provenance that quietly leaves out an input or a run would say less than it seems to
    for path in args.data:
        if not Path(path).is_file():
            return fail(f"--data {path}: no such file")
    for run in args.runs:
        if not Path(run).is_dir():
            return fail(f"run directory {run}: not found")
    rec = collect(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "provenance.json", json.dumps(rec, indent=2) + "\n")
    write_atomic(args.out / "provenance.md", markdown(rec))
    print(f"wrote {args.out / 'provenance.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
