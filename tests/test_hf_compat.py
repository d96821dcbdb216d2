"""An exported Hugging Face folder loads in transformers 4.x and 5.x; a folder saved by 4.x imports.

The 4.x side runs in a second, minimal environment: ``.venv-tf4`` in the checkout (ignored by git through its own
``.gitignore``), created on first use with pip — transformers at the floor pyproject promises and what it pins
(tokenizers, huggingface-hub), everything else (torch, safetensors, sentencepiece, numpy) this venv's own, reached
through a ``.pth`` line that comes after the overlay's packages — and reused while its spec stays the same (a few
seconds to create: no second 1 GB torch). Tests that need it skip, saying why, only when pip cannot reach a package
index.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from data.tokenizer import Tokenizer
from models import GPT, GPTConfig
from tests.test_train import REPO, clean_env

TF4_SPEC = "transformers==4.44.2"  # pyproject's floor (transformers>=4.44): the oldest release promised to work
VENV = REPO / ".venv-tf4"
OFFLINE_SIGNS = ("Could not find a version", "No matching distribution", "NewConnectionError",
                 "Temporary failure in name resolution", "Network is unreachable", "ProxyError")  # fmt: skip
TEXTS = ["Fair is foul, and foul is fair: hover through the fog and filthy air.", "  two  spaces, é ☃ 123"]

# Run by each interpreter: load the folder the way a user of that transformers release would.
PROBE = """
import json, sys, torch, transformers
folder, ids_json, texts_json = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
tok = transformers.AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(torch.tensor(json.loads(ids_json))).logits
print(json.dumps({
    "version": transformers.__version__,
    "model": type(model).__name__,
    "tokenizer": type(tok).__name__,
    "encoded": [tok(t, add_special_tokens=False)["input_ids"] for t in json.loads(texts_json)],
    "logits": logits.tolist(),
}))
"""

# Run by transformers 4.x: a model saved the 4.x way (its own key names for rotary settings and norms).
SAVE_4X = """
import json, sys, torch, transformers
block, folder, ids_json = sys.argv[1:4]
shape = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=64, tie_word_embeddings=False)
if block == "neox":
    config = transformers.GPTNeoXConfig(**shape, rotary_pct=0.5, rotary_emb_base=5000, layer_norm_eps=1e-6,
                                        use_parallel_residual=False)
    cls = transformers.GPTNeoXForCausalLM
else:
    config = transformers.LlamaConfig(**shape, num_key_value_heads=4, rope_theta=5000.0, rms_norm_eps=1e-5)
    cls = transformers.LlamaForCausalLM
torch.manual_seed(2)
model = cls(config).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.2)  # attention far from uniform, so that positions and rotary matter
    logits = model(torch.tensor(json.loads(ids_json))).logits
model.save_pretrained(folder, safe_serialization=True)
print(json.dumps({"version": transformers.__version__, "logits": logits.tolist()}))
"""


def _pip_failed(what: str, proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    if any(sign in out for sign in OFFLINE_SIGNS):
        pytest.skip(f"{what}: pip cannot reach a package index ({out.strip().splitlines()[-1][:200]})")
    pytest.fail(f"{what} failed:\n{out[-3000:]}")


@pytest.fixture(scope="session")
def tf4_python() -> Path:
    """The interpreter of ``.venv-tf4`` (created or refreshed when its spec changed)."""
    python = VENV / "bin" / "python"
    spec = [TF4_SPEC, f"over {sysconfig.get_paths()['purelib']}"]
    stamp = VENV / ".losslab-spec"
    # one builder at a time: two pytest processes (a developer's and CI's) may want it at once
    with open(Path(tempfile.gettempdir()) / "losslab-venv-tf4.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (python.is_file() and stamp.is_file() and stamp.read_text() == " ".join(spec)):
            _build_venv(spec, stamp)
    return python


def _build_venv(spec: list[str], stamp: Path) -> None:
    python = VENV / "bin" / "python"
    shutil.rmtree(VENV, ignore_errors=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.fail(f"python -m venv {VENV} failed:\n{made.stderr[-2000:]}")
    (VENV / ".gitignore").write_text("*\n")  # the environment never shows up in git status or a commit
    overlay = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # sys.path: the overlay's site-packages, then this venv's (a .pth line is appended after its directory)
    (Path(overlay) / "losslab_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", TF4_SPEC], capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    if pip.returncode != 0:
        _pip_failed(f"pip install {TF4_SPEC} into {VENV}", pip)
    stamp.write_text(" ".join(spec))


def _run(python: Path | str, script: str, *args: str) -> dict:
    proc = subprocess.run([str(python), "-c", script, *args], cwd="/", env={**clean_env(), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _checkpoint(style_name: str, tokenizer: str, out: Path) -> GPT:
    """A losslab checkpoint directory (the files load_model reads) of a model with non-default rotary settings;
    ``llama-gqa-tied``: grouped-query attention (2 key/value heads for 4 query heads) and tied embeddings;
    ``neox-hf-tokenizer``: the checkpoint carries a ``tokenizer.json`` instead of a sentencepiece model."""
    block = style_name.split("-")[0]
    if block == "neox":
        style = {"rotary_pct": 0.5, "parallel_residual": False}
    else:
        style = {"rotary_pct": 1.0, "parallel_residual": False, "bias": False}
    if style_name == "llama-gqa-tied":
        style.update(n_kv_heads=2, tie_embeddings=True)
    vocab = Tokenizer(tokenizer).vocab_size
    cfg = GPTConfig(vocab_size=vocab, n_layers=2, d_model=64, n_heads=4, d_mlp=96, max_seq_len=64, block=block,
                    rotary_base=5000.0, norm_eps=1e-6, **style)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model_config.json").write_text(json.dumps(asdict(cfg)))
    if style_name.endswith("hf-tokenizer"):
        from data.hf_tokenizer import to_hf_tokenizer

        to_hf_tokenizer(tokenizer).save_pretrained(out)  # tokenizer.json + tokenizer_config.json
    else:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    (out / "meta.json").write_text(json.dumps({"step": 0, "tokens": 0}))
    return model.eval()


@pytest.fixture(scope="module", params=["neox", "llama", "llama-gqa-tied", "neox-hf-tokenizer"])
def exported(request, corpus, tmp_path_factory) -> tuple[str, GPT, Path]:
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    model = _checkpoint(request.param, corpus["tokenizer"], root / "ckpt")
    from scripts.export_hf import export  # the script's function (its command line: the refusal tests below)

    return request.param, model, export(str(root / "ckpt"), str(root / "hf"))


@pytest.mark.parametrize("major", ["4", "5"])
def test_exported_folder_loads_in_transformers_4_and_5(exported, major, corpus, request, tmp_path):
    block, model, folder = exported
    python = request.getfixturevalue("tf4_python") if major == "4" else sys.executable
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    got = _run(python, PROBE, str(folder), json.dumps(ids.tolist()), json.dumps(TEXTS))
    assert got["version"].split(".")[0] == major
    assert got["model"] == ("GPTNeoXForCausalLM" if block.startswith("neox") else "LlamaForCausalLM")
    if block == "llama-gqa-tied":  # really GQA and tied on their side
        config = json.loads((folder / "config.json").read_text())
        assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    assert got["tokenizer"] in ("PreTrainedTokenizerFast", "TokenizersBackend")  # 5.x's name for the same class
    sp = Tokenizer(corpus["tokenizer"])
    assert got["encoded"] == [sp.encode(t) for t in TEXTS]
    with torch.no_grad():  # rotary fraction, rotary base and norm eps all differ from the defaults: all arrived
        assert (torch.tensor(got["logits"]) - model.logits(ids)).abs().max() < 1e-4
    if major == "5":  # and back: the folder imports to the same model (as model.init_from=HF_DIR reads it)
        from models.checkpoint import load_model
        from scripts.import_hf import import_hf

        back, ckpt = load_model(import_hf(str(folder), str(tmp_path / "back")))
        assert back.cfg == model.cfg
        assert [Tokenizer(ckpt).encode(t) for t in TEXTS] == got["encoded"]  # with the folder's own tokenizer
        with torch.no_grad():
            assert torch.equal(back.logits(ids), model.logits(ids))


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_a_folder_saved_by_transformers_4_imports(block, tf4_python, corpus, tmp_path):
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(3))
    saved = _run(tf4_python, SAVE_4X, block, str(tmp_path / "hf"), json.dumps(ids.tolist()))
    assert saved["version"].startswith("4.")
    assert "rope_parameters" not in json.loads((tmp_path / "hf" / "config.json").read_text())  # the 4.x keys only
    from models.checkpoint import load_model
    from scripts.import_hf import import_hf

    ours, _ = load_model(import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), corpus["tokenizer"]))
    with torch.no_grad():
        assert (ours.logits(ids) - torch.tensor(saved["logits"])).abs().max() < 1e-4


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _one_clean_line(proc: subprocess.CompletedProcess, names: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(names) in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_export_and_import_refuse_torn_weights_with_one_line(corpus, tmp_path, capsys):
    _checkpoint("neox", corpus["tokenizer"], tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a copy cut short
    _one_clean_line(_script("export_hf.py", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")),
                    weights)  # fmt: skip

    from scripts.export_hf import export
    from scripts.import_hf import main as import_main

    _checkpoint("llama", corpus["tokenizer"], tmp_path / "good")
    export(str(tmp_path / "good"), str(tmp_path / "hf"))
    hf_weights = tmp_path / "hf" / "model.safetensors"
    hf_weights.write_bytes(b"not a safetensors file at all")
    _one_clean_line(_script("import_hf.py", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")), hf_weights)

    hf_weights.rename(tmp_path / "hf" / "pytorch_model.bin")  # pickled weights are refused, never unpickled
    capsys.readouterr()  # (the export's progress bar)
    assert import_main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'hf'}: only pickled .bin weights") and err.count("\n") == 1


def test_export_refuses_a_tokenizer_that_is_not_the_models(corpus, tmp_path):
    _checkpoint("neox", corpus["tokenizer"], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "model_config.json").read_text())
    config["vocab_size"] += 1000  # a model trained with another, larger tokenizer
    (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps(config))
    model = GPT(GPTConfig(**config))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    _one_clean_line(_script("export_hf.py", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")),
                    tmp_path / "ckpt" / "tokenizer.model")  # fmt: skip


# Run by each interpreter with this checkout first on the path: losslab.hf.patch on that transformers release.
PATCH = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers
from losslab import hf

def tiny(cls, config, tied):
    torch.manual_seed(0)
    model = cls(config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, tie_word_embeddings=tied)).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model

report = {"version": transformers.__version__}
ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
labels = ids.clone()
labels[0, :5] = -100
for name, cls, config in (("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig),
                          ("neox", transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig)):
    for tied in (False, True):
        model = tiny(cls, config, tied)
        hidden = model.base_model(input_ids=ids)[0]  # float64 (4.x casts its logits to float32)
        logits = torch.nn.functional.linear(hidden, model.get_output_embeddings().weight)
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1))
        ref.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.eval()
        generated = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        hf.patch(model, "ce")
        model.train()
        n = int((labels[:, 1:] != -100).sum())
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(2 * n))  # a step of 2 batches
        (out.loss * 2).backward()  # (a power of two: 4.x casts the head's output, and its gradient, to float32)
        err = max(((p.grad - want[k]).norm() / want[k].norm()).item() for k, p in model.named_parameters())
        model.eval()
        same = torch.equal(model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0), generated)
        report[f"{name}-{'tied' if tied else 'untied'}"] = {
            "loss": (out.loss * 2).item(), "ref": ref.item(), "grad_err": err, "logits": out.logits is None,
            "generate": same}
print(json.dumps(report))
"""


@pytest.mark.parametrize("major", ["4", "5"])
def test_the_hf_patch_works_in_transformers_4_and_5(major, request):
    """losslab.hf.patch calls the model's own forward and intercepts only its LM head, so one implementation
    serves transformers 4.44 (no num_items_in_batch, past_key_values) and 5.x (cache, can_return_tuple)."""
    python = request.getfixturevalue("tf4_python") if major == "4" else sys.executable
    got = _run(python, PATCH, str(REPO))
    assert got.pop("version").split(".")[0] == major
    assert len(got) == 4
    for case, r in got.items():
        assert r["loss"] == pytest.approx(r["ref"], rel=1e-12), case
        assert r["grad_err"] < 1e-10 and r["logits"] and r["generate"], (case, r)
