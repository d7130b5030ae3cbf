"""fasttune's training step against transformers' own Trainer: the same micro-batches (uneven target counts, packed
documents, gradient accumulation) and the same settings give the same loss, gradient norm and learning rate at every
step, and the same weights after them: the loss normalised over the whole step's targets (num_items_in_batch),
clipping, HF's weight-decay groups, AdamW's betas and epsilon (HF's defaults, as a user coming from it sets them) and
the cosine schedule to a floor (HF's cosine_with_min_lr; without warmup, whose shape differs: README "Coming from HF
Trainer or TRL")."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import save_micro_model, sft_config
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from fasttune.config import TrainingConfig
from fasttune.errors import ConfigError
from fasttune.train import loop
from fasttune.train import run as run_module

STEPS, ACCUM = 4, 3
HF = dict(learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.3)


def test_a_run_trains_as_hf_trainer_does_on_the_same_micro_batches(tmp_path, monkeypatch):
    base = save_micro_model(tmp_path / "base")
    cfg = sft_config(tmp_path, base, max_steps=STEPS, save_every=STEPS, eval_every=0, warmup_steps=0, lr=3e-3,
                     weight_decay=0.1, adam_beta2=0.999, max_grad_norm=0.3, grad_accum=ACCUM, micro_batch_size=2,
                     val_fraction=0.1)  # fmt: skip
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="fp32"))
    seen = []
    forward_backward = run_module.forward_backward

    def spy(model, batches, *args):
        seen.extend({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches)
        return forward_backward(model, batches, *args)

    monkeypatch.setattr(run_module, "forward_backward", spy)
    ours = loop.train(cfg)
    targets = [int((b["labels"][..., 1:] != -100).sum()) for b in seen]
    assert len(set(targets)) > 2 and "cu_seq_lens_q" in seen[0]  # packed, and the micro-batches really are uneven

    class Replay(Trainer):
        def get_train_dataloader(self):
            return seen  # fasttune's micro-batches, in its order

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=STEPS,
                             gradient_accumulation_steps=ACCUM, lr_scheduler_type="cosine_with_min_lr",
                             lr_scheduler_kwargs={"min_lr_rate": cfg.training.min_lr_ratio}, warmup_steps=0,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, **HF)  # fmt: skip
    hf_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    trainer = Replay(model=hf_model, args=args)
    trainer.train()
    theirs = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    mine = {r["step"]: r for r in ours.records if r.get("loss") is not None}
    assert mine.keys() == theirs.keys() == set(range(1, STEPS + 1))
    for step, r in mine.items():
        assert r["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-5), step
        assert r["grad_norm"] == pytest.approx(theirs[step]["grad_norm"], rel=1e-4), step
        assert r["grad_norm"] > HF["max_grad_norm"]  # clipping acted on every step
        assert r["lr"] == pytest.approx(theirs[step]["learning_rate"], rel=1e-9), step
    saved = AutoModelForCausalLM.from_pretrained(ours.checkpoint, dtype=torch.float32)
    hf_weights = dict(trainer.model.named_parameters())
    for name, p in saved.named_parameters():
        err = float((p - hf_weights[name]).detach().abs().max() / hf_weights[name].detach().abs().max())
        assert err < 2e-3, (name, err)  # float rounding (fasttune's fused kernels) that Adam's first steps enlarge


@pytest.mark.parametrize("field,value", [("adam_beta1", 1.0), ("adam_beta2", -0.1), ("adam_epsilon", 0.0)])
def test_adam_options_out_of_range_are_one_line(field, value):
    with pytest.raises(ConfigError, match=f"training.{field}={value!r} is not valid"):
        TrainingConfig(**{field: value})


@pytest.mark.parametrize(
    "flag,says",
    [("--lr_scheduler_type", "--training.min-lr-ratio x --training.lr (HF's cosine_with_min_lr"),
     ("--warmup_ratio", "--training.warmup-steps N (HF's warmup_ratio R is N = ceil(R x the run's steps))"),
     ("--adam_beta2", "did you mean --training.adam-beta2?")],
)  # fmt: skip
def test_hf_schedule_and_adam_options_are_answered_with_fasttunes(flag, says, capsys):
    """HF Trainer's names for the schedule and AdamW: the schedule fasttune has instead (--lr_scheduler_type was
    only "see --help"), warmup in steps, and AdamW's own options (--adam_beta2 was "did you mean --data?")."""
    from fasttune import cli

    assert cli.main(["train", "--experiment", "quick", flag, "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
