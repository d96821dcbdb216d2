"""Run by tests/test_hf_deepspeed.py under torchrun (one gloo rank on the CPU): transformers' Trainer with its
DeepSpeed integration at ZeRO stage 3 — the model built partitioned by from_pretrained, the tied LM head's
weight gathered only around its call — training a tiny tied Llama for three SGD steps with the losslab patch
and, in the same process, without it. Writes {"patched": [...], "plain": [...], "partitioned": bool} to argv[1]."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run this checkout's code, never an installed copy

from losslab import hf  # noqa: E402


def rows() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(8):
        ids = torch.randint(0, 96, (10,), generator=g)
        labels = ids.clone()
        labels[: i % 4] = -100  # micro-batches with different numbers of targets
        out.append({"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels})
    return out


def run(folder: str, patched: bool) -> tuple[list[float], bool]:
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
          "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True}  # fmt: skip
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=3, learning_rate=0.5,
                                          max_grad_norm=0.0, report_to=[], save_strategy="no", logging_steps=1,
                                          deepspeed=ds, use_cpu=True, seed=0)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # partitioned as it is built (zero.Init)
    partitioned = hasattr(model.lm_head.weight, "ds_id") and model.lm_head.weight.numel() == 0
    if patched:
        hf.patch(model, "ce")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], partitioned


def main() -> None:
    from trainer.engine import skip_cpu_shm_build

    skip_cpu_shm_build()  # as losslab's own engine does: no minute-long compile of an op a CPU test never needs
    folder = tempfile.mkdtemp()
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    patched, partitioned = run(folder, patched=True)
    plain, _ = run(folder, patched=False)
    Path(sys.argv[1]).write_text(json.dumps({"patched": patched, "plain": plain, "partitioned": partitioned}))


if __name__ == "__main__":
    from trainer.engine import exit_process

    main()
    exit_process(0)  # as scripts/train.py ends: no C++ teardown, where a gloo rank can abort after finishing
