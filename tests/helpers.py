"""Small configs for end-to-end tests: micro model (2 layers, hidden 64), a 40-file slice of the embedded corpus."""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import shutil
from pathlib import Path

from fasttune.config import BaseConfig, get_experiment

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = FIXTURES / "gsm8k_alpaca_20.json"

TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=96, max_position_embeddings=512)  # fmt: skip
# fmt: off
TINY_MODELS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # block_sparse_moe.experts.N.w1/w2/w3 in its files
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),  # renamed, not split: input_linear, output_linear
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),  # fused in its files too
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, layer_types=["linear_attention", "full_attention"],
                       linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_shared_experts=1),
    "gpt_neox": dict(),  # dense: its head is embed_out in its files, lm_head in the model
}
# fmt: on
"""Tiny configs of model families whose weights transformers converts as it loads them (MoE experts it fuses; GPT-NeoX's
head): their files hold other names and shapes than their modules."""


def tiny_config(tmp_path: Path, **training) -> BaseConfig:
    cfg = get_experiment("quick")
    return dataclasses.replace(
        cfg,
        output_dir=str(tmp_path / "run"),
        model=dataclasses.replace(cfg.model, preset="micro"),
        data=dataclasses.replace(
            cfg.data,
            max_documents=40,
            tokenizer_vocab_size=384,
            max_length=64,
            micro_batch_size=4,
            cache_dir=str(tmp_path.parent / "tok-cache"),
        ),
        training=dataclasses.replace(
            cfg.training,
            **{
                "max_steps": 6,
                "warmup_steps": 2,
                "eval_every": 3,
                "eval_batches": 2,
                "save_every": 3,
                "log_every": 1,
                "lr": 1e-3,
                **training,
            },
        ),
        generation=dataclasses.replace(cfg.generation, sample_prompt=""),
    )


def train_fresh(cfg: BaseConfig):
    """loop.train(cfg) seeded and reset as _reset_global_state does for a test, for a module- or session-scoped
    fixture (such a fixture is set up before it)."""
    import torch

    from fasttune.attention import state
    from fasttune.train import loop

    random.seed(0)
    torch.manual_seed(0)
    state.reset()
    result = loop.train(cfg)
    state.reset()
    return result


def train_once(tmp_path_factory, name: str, **training):
    """(config, result) of tiny_config(**training) trained by train_fresh in a folder of its own."""
    cfg = tiny_config(tmp_path_factory.mktemp(name), **training)
    return cfg, train_fresh(cfg)


def copy_of_run(trained, tmp_path):
    """(config, result) of a copy of the run `trained` ((config, result), as train_once gives) in tmp_path / "run",
    where tiny_config(tmp_path) trains: each test gets its own copy of a run trained once, so one that damages,
    resumes or writes into it leaves the others' as trained."""
    cfg, result = trained
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)

    def moved(path):
        return None if path is None else run_dir / path.relative_to(result.run_dir)

    copied = dataclasses.replace(result, run_dir=run_dir, checkpoint=moved(result.checkpoint),
                                 model_dir=moved(result.model_dir), records=copy.deepcopy(result.records))  # fmt: skip
    return dataclasses.replace(cfg, output_dir=str(run_dir)), copied


def copy_of_project(root: Path, tmp_path: Path) -> Path:
    """A copy in `tmp_path` of the folder `root` holding a run (run/) and the model and data it read, its config.json
    naming the copies (as a run trained there records them): `tmp_path`."""
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    config = tmp_path / "run" / "config.json"
    config.write_text(config.read_text().replace(str(root), str(tmp_path)))
    return tmp_path


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def assert_same_losses_without(tmp_path: Path, caplog, field: str, logged: str) -> None:
    """A model transform on by default (its log line contains `logged`) trains the same CPU losses as the run with
    model.<field> off."""
    from fasttune.train import loop

    caplog.set_level("INFO", logger="fasttune")
    on = loop.train(tiny_config(tmp_path / "on"))
    assert logged in caplog.text
    cfg = tiny_config(tmp_path / "off")
    off = loop.train(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{field: False})))
    got, want = losses(on.records), losses(off.records)
    assert got.keys() == want.keys() and len(got) > 3
    assert all(abs(got[k] - want[k]) <= 1e-5 * abs(want[k]) for k in want)


def assert_same_step(ref, ours, batch: dict, atol: float = 1e-7, loss_rtol: float = 1e-6, what=None) -> None:
    """One forward + backward of `batch` through both models: the same loss, and the same gradient for every
    parameter that has one in `ref` (frozen ones: none)."""
    import torch

    from fasttune.data.packing import count_targets
    from fasttune.train.step import forward_backward

    n = count_targets(batch)
    a, b = forward_backward(ref, [batch], n, None), forward_backward(ours, [batch], n, None)
    assert torch.allclose(a, b, rtol=loss_rtol), (what, a, b)
    pairs = [(name, p.grad, q.grad) for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True)
             if p.grad is not None]  # fmt: skip
    assert pairs, what
    for name, want, got in pairs:
        assert torch.allclose(want, got, rtol=1e-5, atol=atol), (what, name)


def twin(ref, forward):
    """(ref, a deep copy of it whose forward is `forward` bound to the copy): a module against its replacement."""
    import copy
    import types

    ours = copy.deepcopy(ref)
    ours.forward = types.MethodType(forward, ours)
    return ref, ours


def run_module(module, x, dy) -> list:
    """Forward x (a fresh leaf), backward dy: [output, input gradient, each parameter's gradient]."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return [y, x.grad, *(p.grad for p in module.parameters())]


def rel_diff(a, b) -> float:
    """The largest difference between a and b relative to b's largest magnitude (in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def save_micro_model(path: Path) -> Path:
    """A micro Llama (seed 0) with the tiny tokenizer (ChatML chat template, no BOS), saved like any local HF model
    folder; returns `path`."""
    from fixtures.tiny_tokenizer import CHATML

    return save_base_model(path, chat_template=CHATML, bos=None)


def save_base_model(path: Path, chat_template=None, context: int = 512, bos: str | None = "<s>") -> Path:
    """A micro Llama (seed 0) with a Llama-like tiny tokenizer that adds `bos` (`chat_template` set when given), with
    `context` positions, saved as a local HF model folder; returns `path`."""
    import torch
    from fixtures.tiny_tokenizer import build_tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from fasttune.model.build import preset_config

    tok = build_tiny_tokenizer(chat_template=chat_template, bos=bos)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config("micro", len(tok), max_position_embeddings=context)).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    return path


def sft_config(
    tmp: Path,
    model: Path,
    data: Path = GSM8K,
    *,
    lora: dict | None = None,
    max_length: int = 256,
    val_fraction: float = 0.2,
    micro_batch_size: int | None = None,
    train_on_prompt: bool = False,
    **training,
) -> BaseConfig:
    """tiny_config(tmp, **training) fine-tuning the model folder `model` (a tokenizer folder does for the data alone)
    on `data` (the 20 GSM8K records by default): experiment sft, or lora with the LoRA fields `lora` when given (an
    empty dict: sft); the data fields as named (micro_batch_size None: tiny_config's)."""
    cfg = tiny_config(tmp, **training)
    return dataclasses.replace(
        cfg,
        experiment="lora" if lora else "sft",
        model=dataclasses.replace(cfg.model, path=str(model)),
        data=dataclasses.replace(
            cfg.data,
            path=str(data),
            max_length=max_length,
            val_fraction=val_fraction,
            micro_batch_size=micro_batch_size or cfg.data.micro_batch_size,
            train_on_prompt=train_on_prompt,
        ),
        lora=dataclasses.replace(cfg.lora, **(lora or {})),
    )


def train_tiny(tmp: Path, base: Path, data: Path = GSM8K, **lora):
    """Two steps of sft (or lora, when `lora` fields are given) from the model folder `base` on `data`; a checkpoint
    at step 2. Returns the run's RunResult."""
    from fasttune.train import loop

    return loop.train(sft_config(tmp, base, data, lora=lora, max_steps=2, save_every=2, eval_every=0))


def deny(monkeypatch, denied: Path) -> None:
    """`denied` behaves as a folder chmod 000 does for a user who is not root (tests run as root, which may read
    anything): listing it, or looking at anything inside it, raises PermissionError."""
    scandir, stat = os.scandir, Path.stat

    def fake_scandir(path="."):
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    def fake_stat(self, **kwargs):  # Python 3.11's Path.is_file and .exists raise this one
        if denied in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return stat(self, **kwargs)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    monkeypatch.setattr(Path, "stat", fake_stat)


def error_for(path: Path | str, fmt: str = "auto") -> str:
    """The one-line DataError load_records raises for the data at `path`."""
    import pytest

    from fasttune.data.formats import load_records
    from fasttune.errors import DataError

    with pytest.raises(DataError) as info:
        load_records(str(path), fmt)
    message = str(info.value)
    assert "\n" not in message, "error messages are one line"
    return message


def deny_file(monkeypatch, method: str, denied: Path) -> None:
    """Path.`method` (read_text, open, ...) on the file `denied` raises PermissionError, as for a file chmod 000 to
    a user who is not root (tests run as root)."""
    real = getattr(Path, method)

    def fake(self, *args, **kwargs):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, fake)


def hf_piece_loss(model_dir: Path, text: str, piece: int) -> tuple[float, int]:
    """Reference: the text (after BOS) + EOS cut into `piece`-token pieces (as training splits it), plain HF loss on
    each piece, token-weighted mean over all of them, and the number of target tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(text)["input_ids"] + [tok.eos_token_id]  # the model's BOS first, as training reads it
    total, n = 0.0, 0
    for lo in range(0, len(ids), piece):
        x = torch.tensor([ids[lo : lo + piece]])
        with torch.no_grad():
            total += float(model(x, labels=x).loss) * (x.shape[1] - 1)
        n += x.shape[1] - 1
    return total / n, n


def save_tiny_model(path, model_type: str, **shape):
    """A tiny model of `model_type` (seed 0; TINY_MODELS holds the fields some types need beyond TINY_SHAPE) with the
    tiny tokenizer, saved by save_pretrained as a local HF model folder; `shape` overrides config fields. Returns
    `path`."""
    import torch
    from fixtures.tiny_tokenizer import CHATML, build_tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tiny_tokenizer(chat_template=CHATML)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), **{**TINY_SHAPE, **TINY_MODELS.get(model_type, {}), **shape}
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fail_at(monkeypatch, call: int, exc_factory=lambda: RuntimeError("simulated crash")):
    """Make the `call`-th forward_backward of the training loop (1-based) raise; every other call runs for real."""
    from fasttune.train import run

    real, count = run.forward_backward, {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise exc_factory()
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "forward_backward", wrapped)


def crash_at(cfg: BaseConfig, call: int) -> None:
    """Train `cfg` until its `call`-th forward_backward raises (fail_at): a run killed mid-way, its checkpoints left
    for a resume. The failure is undone when it returns."""
    import pytest

    from fasttune.train import loop

    with pytest.MonkeyPatch.context() as monkeypatch:
        fail_at(monkeypatch, call)
        with pytest.raises(RuntimeError, match="simulated crash"):
            loop.train(cfg)
