"""A few ``transformers.Trainer`` steps of a Hugging Face model with losslab's patch and without, side by side
(issue #28): the same weights, data and seed for each; reported per variant are the loss of every step (the
patched ``ce`` must equal transformers' own), the median time per step and the peak memory of a step.

    python scripts/bench_hf_patch.py                               # SmolLM2-135M-Instruct on the CPU
    python scripts/bench_hf_patch.py --device cuda --random-init   # a GPU machine without the weights

Time: every variant trains at once, each ``Trainer`` in a thread of its own, their steps taking turns (patched,
plain, patched, ...: one step runs at a time), so that a busy machine hits all alike; the median of
``--steps`` steps after a warm-up step. The rows are fed in order (no shuffling), the same to each. Peak memory
of a step: afterwards, each variant alone, its second step (the first allocates the optimizer's state): on the
CPU the peak of live tensors allocated during the step, from torch's profiler memory timeline (as
``bench_loss.py --cpu-memory``); on a GPU ``max_memory_allocated`` above what was allocated when it began.

``--random-init``: the model's shape from its config (or SmolLM2-135M's, written out here) with random weights:
the same speed and memory, losses that mean nothing but still match (``--shape num_hidden_layers=1 ...`` makes
a toy of it: scripts/gpu/validate.sh --toy).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch

from losslab.log import fail, get_logger

log = get_logger(__name__)

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "corpus" / "smollm2-135m-instruct"
# SmolLM2-135M's shape (its config.json), for --random-init where the weights are not at hand
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)  # fmt: skip


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer or None)."""
    import transformers

    folder = Path(args.model)
    dtype = torch.bfloat16 if args.precision == "bf16" and args.device == "cuda" else torch.float32
    if args.random_init:
        if (folder / "config.json").is_file():
            config = transformers.AutoConfig.from_pretrained(folder)
        else:
            config = transformers.LlamaConfig(**SMOLLM2_SHAPE)
        for item in args.shape:  # e.g. num_hidden_layers=2: a toy of the same family
            key, _, value = item.partition("=")
            setattr(config, key, int(value) if value.lstrip("-").isdigit() else float(value))
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype), None
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {folder}: no model (scripts/fetch_smollm2.py fetches SmolLM2; or --random-init)")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def batches(tokenizer: Any, vocab: int, seq: int, n: int) -> tuple[list[dict[str, torch.Tensor]], str]:
    """n rows of seq tokens: held-out text of the default corpus, packed, when a tokenizer and the corpus are at
    hand; random ids otherwise. -> (rows, what they are)."""
    files = sorted(glob.glob(str(REPO / "corpus" / "default" / "val*.jsonl.zst")))
    ids: list[int] = []
    if tokenizer is not None and files:
        from data.shards import ReadStats, iter_documents

        for doc in iter_documents(files[0], ReadStats()):
            ids += tokenizer(doc.text)["input_ids"]
            if len(ids) >= n * seq:
                break
    if len(ids) >= n * seq:
        what = f"{Path(files[0]).relative_to(REPO)} (packed)"
        flat = torch.tensor(ids[: n * seq])
    else:
        what = "random ids"
        flat = torch.randint(0, vocab, (n * seq,), generator=torch.Generator().manual_seed(0))
    rows = flat.view(n, seq)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows], what


class Turns:
    """Step-level alternation of Trainers running in threads: each waits for its turn at the start of a step and
    passes it on at the end, so their steps interleave (A, B, A, B, ...) and a busy machine hits both alike."""

    def __init__(self, names: list[str]) -> None:
        self.cond = threading.Condition()
        self.names, self.turn, self.finished = names, 0, set()

    def _current(self) -> str:
        live = [n for n in self.names if n not in self.finished]
        return live[self.turn % len(live)] if live else ""

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self._current() == name)

    def done_step(self, name: str) -> None:
        with self.cond:
            self.turn += 1
            self.cond.notify_all()

    def finish(self, name: str) -> None:
        with self.cond:
            self.finished.add(name)
            self.cond.notify_all()


class StepProbe:
    """Trainer callback: the time of every step (in turn with the other variants, when ``turns`` is given), and
    the peak memory of step ``measure_step`` (0: none)."""

    def __init__(self, name: str, device: str, measure_step: int = 0, turns: Turns | None = None) -> None:
        self.name, self.device, self.measure_step, self.turns = name, device, measure_step, turns
        self.times: list[float] = []
        self.peak_mib = float("nan")
        self.t0 = 0.0
        self.prof: Any = None
        self.base = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.turns is not None:
            self.turns.wait(self.name)
        if state.global_step + 1 == self.measure_step:
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            else:
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                    with_stack=True)  # fmt: skip
                self.prof.start()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.t0
        if state.global_step == self.measure_step:
            if self.device == "cuda":
                self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
            else:
                self.prof.stop()
                self.peak_mib = timeline_peak_mib(self.prof)
        else:
            self.times.append(elapsed)
        if self.turns is not None:
            self.turns.done_step(self.name)


def timeline_peak_mib(prof: Any) -> float:
    """The peak of live tensor memory in the profiled window (every allocation and free, all categories)."""
    import warnings

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())
    return max((sum(s) for s in sizes), default=0) / 2**20


def trainer_run(model0: Any, rows: list[dict], loss: str | None, steps: int, probe: StepProbe,
                args: argparse.Namespace) -> list[float]:  # fmt: skip
    """``steps`` Trainer steps from the initial weights, the rows in order -> the loss of each step."""
    import transformers
    from torch.utils.data import SequentialSampler

    from losslab import hf

    model = copy.deepcopy(model0)
    if loss is not None:
        hf.patch(model, loss)
    losses: list[float] = []

    class Trainer(transformers.Trainer):
        def training_step(self, *a: Any, **k: Any) -> torch.Tensor:
            out = super().training_step(*a, **k)
            losses.append(out.item())
            return out

        def _get_train_sampler(self, *a: Any, **k: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)  # the same rows in the same order for every variant

    class Callback(transformers.TrainerCallback):
        on_step_begin = staticmethod(probe.on_step_begin)
        on_step_end = staticmethod(probe.on_step_end)

    targs = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=1e-4,
        report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16" and args.device == "cuda", disable_tqdm=True, dataloader_num_workers=0,
        logging_strategy="no",
    )  # fmt: skip
    try:
        Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Callback()]).train()
    finally:
        if probe.turns is not None:
            probe.turns.finish(probe.name)
    return losses


def timed(model0: Any, rows: list[dict], variants: dict[str, str | None], args: argparse.Namespace) -> dict:
    """Every variant trained at once, in threads, their steps alternating -> name: (losses, step times)."""
    turns = Turns(list(variants))
    probes = {name: StepProbe(name, args.device, turns=turns) for name in variants}
    results: dict[str, Any] = {}

    def work(name: str) -> None:
        try:
            results[name] = trainer_run(model0, rows, variants[name], args.steps + 1, probes[name], args)
        except BaseException as e:  # reported by the main thread
            results[name] = e

    threads = [threading.Thread(target=work, args=(name,)) for name in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, r in results.items():
        if isinstance(r, BaseException):
            raise RuntimeError(f"{name}: {type(r).__name__}: {r}") from r
    # the first step of each warms up (first use of every kernel, the optimizer's state)
    return {name: (results[name], probes[name].times[1:]) for name in variants}


def peak(model0: Any, rows: list[dict], loss: str | None, args: argparse.Namespace) -> float:
    """The peak memory of a step (the second: the first allocates the optimizer's state), alone on the machine."""
    probe = StepProbe("memory", args.device, measure_step=2)
    trainer_run(model0, rows, loss, 2, probe, args)
    return probe.peak_mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SMOLLM2), help="a transformers folder (default: SmolLM2-135M)")
    parser.add_argument("--random-init", action="store_true", help="the folder's (or SmolLM2's) shape, random")
    parser.add_argument("--shape", nargs="*", default=[], help="with --random-init: config overrides, key=value")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: the model in bf16 (GPU)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each variant (after a warm-up step)")
    parser.add_argument("--extra", nargs="*", default=["mile"], help="other losses, patched only")
    parser.add_argument("--json", default="", help="write the rows here (a list)")
    parser.add_argument("--append", action="store_true", help="add the rows to the list already in --json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but no CUDA device")
    torch.manual_seed(0)
    model0, tokenizer = load_model(args)
    model0.to(args.device)
    vocab = model0.get_output_embeddings().out_features
    n = args.batch * (args.steps + 1)
    rows, data = batches(tokenizer, vocab, args.seq, n)
    variants: dict[str, str | None] = {"patched ce": "ce", "plain ce": None}
    variants.update({f"patched {loss}": loss for loss in args.extra})
    times = timed(model0, rows, variants, args)
    for name, (losses, step_s) in times.items():
        log.info(f"{name}: losses {losses}, step s {[round(t, 3) for t in step_s]}")
    peaks = {name: peak(model0, rows, loss, args) for name, loss in variants.items()}
    plain = times["plain ce"][0]
    meta = {"bench": "hf_patch", "model": "random init" if args.random_init else Path(args.model).name,
            "device": args.device, "precision": args.precision, "seq": args.seq, "batch": args.batch, "data": data,
            "params": sum(p.numel() for p in model0.parameters()), "vocab": vocab}  # fmt: skip
    out = []
    for name, (losses, step_s) in times.items():
        median = statistics.median(step_s)
        row = {**meta, "variant": name, "s_per_step": median, "tokens_per_s": args.batch * args.seq / median,
               "step_s": step_s, "peak_mib": peaks[name], "losses": losses}  # fmt: skip
        if name.endswith(" ce"):
            pairs = zip(losses, plain, strict=True)
            row["max_rel_loss_diff_vs_plain"] = max(abs(a - b) / abs(b) for a, b in pairs)
        out.append(row)
    base = next(r for r in out if r["variant"] == "plain ce")
    print(f"{meta['model']} on {args.device} ({args.precision}), micro-batch {args.batch} x {args.seq}, {data}:")
    print("| variant | s / step (median) | tokens/s | peak MiB of a step | vs plain: time, memory | losses |")
    print("|---|---|---|---|---|---|")
    for r in out:
        losses = ", ".join(f"{x:.5f}" for x in r["losses"])
        vs = f"{r['s_per_step'] / base['s_per_step']:.2f}x, {r['peak_mib'] / base['peak_mib']:.2f}x"
        print(f"| {r['variant']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} | {vs} | "
              f"{losses} |")  # fmt: skip
    if args.json:
        path = Path(args.json)
        previous = json.loads(path.read_text()) if args.append and path.is_file() else []
        path.write_text(json.dumps(previous + out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
