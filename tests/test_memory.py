"""The memory plan: the estimate against measured peaks, the planner picks the least recomputation that fits
simulated free memory, and a run that cannot fit stops before its first step with advice that fits. That every plan
trains exactly like no plan (same loss and gradients): tests/test_memory_plans.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fasttune.config import ModelConfig
from fasttune.data.packing import collate
from fasttune.errors import ConfigError, FasttuneError
from fasttune.model.build import build_preset, preset_config
from fasttune.train.activations import Shape, lora_bytes
from fasttune.train.estimate import GiB, Setup, estimate
from fasttune.train.loop import train
from fasttune.train.memory import HEADROOM, auto_order, choose_plan
from tests.helpers import tiny_config

VOCAB = 300


def _batch():
    """A packed micro-batch of four documents (the plan, offload, norm and MLP tests' reference step)."""
    g = torch.Generator().manual_seed(1)
    samples = [{"input_ids": (ids := torch.randint(2, VOCAB, (n,), generator=g).tolist()), "labels": ids}
               for n in (17, 30, 9, 25)]  # fmt: skip
    return collate(samples, packing=True, pad_id=0)


def _setup(tokens: int, liger: bool = False) -> Setup:
    config = preset_config("1b", 32000)
    n = 1_104_150_528  # the 1b preset's parameter count
    return Setup(Shape.of(config), n, n, 2, 4.0, tokens, liger=liger, loss="liger" if liger else "chunked")


def test_estimate_matches_the_measured_h100_peaks():
    """docs/BENCHMARKS.md (H100, 1B shape, pure bf16): Liger + no checkpointing 25.2 GiB at 16k tokens, 15.8 at 8k,
    11.1 at 4k; the model's own loss, no Liger: 41.4 at 16k. The estimate may be high by a little, never low."""
    for tokens, measured in ((16384, 25.2), (8192, 15.8), (4096, 11.1)):
        predicted = estimate(_setup(tokens, liger=True), "none").total / GiB
        assert measured <= predicted <= measured * 1.1, (tokens, predicted)
    hf = estimate(Setup(**{**_setup(16384).__dict__, "loss": "hf"}), "none").total / GiB
    assert 41.4 * 0.95 <= hf <= 41.4 * 1.1


def _expanded_kv(st: Setup, plan: str) -> float:
    """Bytes torch 2.11's varlen_attn kept beyond what fasttune's call of the same kernel keeps now: k and v expanded
    to the query heads, 4(q - kv) bytes per token in each layer that keeps its attention's inputs (none of them under
    `ops`, which recomputes the expansion; every other one under every:2)."""
    s = st.shape
    kept = {"none": 1.0, "ops": 0.0}[plan] if ":" not in plan else 1 - 1 / int(plan.split(":")[1])
    return 4 * (s.q - s.kv) * st.tokens * s.layers * kept


def test_estimate_matches_the_measured_h200_peaks():
    """docs/BENCHMARKS.md "Memory" and "Scale" (H200, pure bf16, chunked loss, no Liger), predicted vs measured
    peak GiB: within 5% below and 10% above. The rows marked expanded ran torch 2.11's varlen_attn, which kept k and
    v expanded to the query heads: the test adds that back (_expanded_kv)."""
    cases = [(_setup(t), plan, measured, True) for t, plan, measured in
             ((16384, "none", 35.6), (16384, "ops", 21.5), (16384, "every:2", 16.0), (8192, "ops", 14.1),
              (4096, "ops", 10.7))]  # fmt: skip
    config = preset_config("llama-3.1-8b", 128256)
    n = 8_030_261_248
    for tokens, plan, measured in ((8192, "ops", 75.2), (32768, "every:2", 108.6)):
        cases.append((Setup(Shape.of(config), n, n, 2, 4.0, tokens), plan, measured, False))
    # one 64k-token document, lean norm and fused MLP (docs/BENCHMARKS.md "Offloading the layers' inputs"): the peaks
    # of plans that recompute whole layers are at the end of backward, beside every gradient
    for plan, measured in (("full", 74.07), ("offload", 71.25)):
        st = Setup(Shape.of(config), n, n, 2, 4.0, 65536, fused_mlp=True, lean_norm=True)
        cases.append((st, plan, measured, False))
    # the fused SwiGLU MLP (docs/BENCHMARKS.md "Memory", fourth run): with Liger at 8k and 10k tokens, without at 8k
    fused = {"fused_mlp": True}
    cases += [(Setup(**{**_setup(8192, liger=True).__dict__, **fused}), "none", 14.0, False),
              (Setup(**{**_setup(10240, liger=True).__dict__, **fused}), "none", 16.0, False),
              (Setup(**{**_setup(8192).__dict__, **fused}), "none", 17.4, True)]  # fmt: skip
    # the lean RMSNorm (docs/BENCHMARKS.md "Memory", the lean norm's run): with Liger at 8k, 10k and 12k tokens, 2 x
    # 8k accumulated; without Liger at 8k
    lean = {**fused, "lean_norm": True}
    cases += [(Setup(**{**_setup(t, liger=True).__dict__, **lean}), "none", m, False)
              for t, m in ((8192, 13.1), (10240, 14.8), (12288, 16.4))]  # fmt: skip
    cases.append((Setup(**{**_setup(8192, liger=True).__dict__, **lean, "accumulating": True}), "none", 15.0, False))
    cases.append((Setup(**{**_setup(8192).__dict__, **lean}), "none", 14.4, True))
    # torch's varlen kernel called directly (docs/BENCHMARKS.md, "torch's varlen kernel, called directly"): the
    # default install at 8k tokens, and with Liger on the same kernel
    cases += [(Setup(**{**_setup(8192).__dict__, **lean}), "none", 13.37, False),
              (Setup(**{**_setup(8192, liger=True).__dict__, **fused}), "none", 14.07, False)]  # fmt: skip
    for st, plan, measured, expanded in cases:
        predicted = (estimate(st, plan).total + (_expanded_kv(st, plan) if expanded else 0)) / GiB
        assert measured * 0.95 <= predicted <= measured * 1.1, (st.tokens, plan, predicted, measured)


def test_auto_picks_the_least_recomputation_that_fits():
    st = _setup(16384)
    picks = {free: choose_plan("auto", st, free * GiB).plan for free in (139, 30, 24, 21, 15)}
    assert picks == {139: "none", 30: "ops", 24: "every:4", 21: "every:2", 15: "full"}
    sizes = [estimate(st, p).total for p in ("none", "ops", "every:4", "every:2", "full")]
    assert sizes == sorted(sizes, reverse=True)
    assert choose_plan("auto", st, None).plan == "none"  # no GPU: nothing to fit
    liger = _setup(16384, liger=True)  # no selective plan with Liger's in-place RoPE (LIGER_ROPE_IN_PLACE)
    picks = {free: choose_plan("auto", liger, free * GiB).plan for free in (139, 27, 21, 15)}
    assert picks == {139: "none", 27: "attention", 21: "mlp", 15: "full"}
    assert estimate(liger, "ops").total < 27 * GiB * HEADROOM  # ops would fit: left out, not too large


def test_a_plan_that_cannot_fit_stops_with_the_numbers_and_the_fixes():
    with pytest.raises(FasttuneError) as e:
        choose_plan("auto", _setup(65536), 16 * GiB)
    msg = str(e.value)
    assert "GiB with memory plan full" in msg and "16.0 GiB free" in msg and "tokens per micro-batch" in msg
    assert "--lora.enabled" in msg
    with pytest.raises(FasttuneError, match="--model.memory ops"):
        choose_plan("none", _setup(16384), 30 * GiB)


def test_the_no_fit_advice_names_the_usable_memory_and_only_changes_that_fit():
    with pytest.raises(FasttuneError) as e:
        choose_plan("full", Setup(**{**_setup(65536).__dict__, "fused_mlp": True}), 16 * GiB)
    msg = str(e.value)  # 16.0 GiB needed: more than the 92% of 16.0 GiB a plan may fill, said as such
    assert f"may use {16 * HEADROOM:.1f} GiB ({HEADROOM:.0%} of the 16.0 GiB free" in msg
    config = preset_config("llama-3.1-8b", 128256)
    n = 8_030_261_248
    eight_b = Setup(Shape.of(config), n, n, 2, 4.0, 8192)
    with pytest.raises(FasttuneError) as e:  # bf16 weights alone are 15 GiB: no optimizer or adapter makes it fit
        choose_plan("auto", eight_b, 16 * GiB)
    msg = str(e.value)
    assert "adamw_8bit" not in msg and "--lora.enabled" not in msg and "--training.fsdp" in msg
    with pytest.raises(FasttuneError) as e:  # 128k tokens with plan none: a plan, or fewer tokens with none, fits
        choose_plan("none", Setup(**{**eight_b.__dict__, "tokens": 131072, "fused_mlp": True}), 139 * GiB)
    msg = str(e.value)
    # 16384 tokens alone would fit, but not beside the gradients that raising --training.grad-accum holds
    assert "--model.memory full" in msg and "8192 tokens per micro-batch" in msg and "with --model.memory none" in msg
    assert "adamw_8bit" not in msg and "--lora.enabled" not in msg  # they alone would not make `none` fit
    eight_bit = {"param_bytes": 4, "optimizer_bytes": 2.0, "optimizer": "adamw_8bit", "autocast": True}
    with pytest.raises(FasttuneError) as e:  # 1B, fp32 + 8-bit moments, 7 GiB: bf16 weights keep those moments
        choose_plan("auto", Setup(**{**_setup(2048).__dict__, **eight_bit}), 7 * GiB)
    assert "--model.dtype bf16" not in str(e.value) and "--lora.enabled" in str(e.value)  # bf16 alone: 6.8 > 6.4
    fp32 = {"param_bytes": 4, "optimizer_bytes": 8.0, "autocast": True}
    with pytest.raises(FasttuneError) as e:  # fp32 master weights: each change alone would fit in 139 GiB
        choose_plan("auto", Setup(**{**eight_b.__dict__, **fp32}), 139 * GiB)
    msg = str(e.value)
    assert "--model.dtype bf16" in msg and "adamw_8bit" in msg and "--lora.enabled" in msg


@pytest.mark.parametrize(("layers", "instead"), [(1, "full"), (2, "every:2, full"), (3, "every:2 to every:3, full")])
def test_every_k_needs_k_layers(layers, instead):
    """every:K with fewer than K layers recomputes no layer whole: refused, saying what the model can take. On a
    1-layer model it said "pick K from 2 to 1, or ops"."""
    st = Setup(**{**_setup(8192).__dict__, "shape": dataclasses.replace(_setup(8192).shape, layers=layers)})
    for k in range(layers + 1, 6):
        with pytest.raises(FasttuneError) as e:
            choose_plan(f"every:{k}", st, None)
        assert str(e.value) == (
            f"model.memory=every:{k}: every:{k} recomputes one decoder layer in {k} whole, so it needs at least {k} "
            f"layers, and this model has {layers}; pass --model.memory {instead} (every layer recomputed whole) or ops "
            "(none recomputed whole)"
        )
    for plan in [f"every:{k}" for k in range(2, layers + 1)] + ["full", "ops"]:  # what the message offers fits
        assert choose_plan(plan, st, None).plan == plan
    plans = [e.plan for e in auto_order(st)]  # auto never considers a plan that recomputes no layer
    assert plans and all(int(p.split(":")[1]) <= layers for p in plans if p.startswith("every:"))
    assert choose_plan("auto", st, 80 * GiB).plan in plans


def test_every_k_beyond_the_layers_stops_before_the_data_is_read(monkeypatch, capsys, tmp_path):
    """The micro preset has 2 decoder layers: every:4 stops in one line, naming the flag, before any data is read or
    model built (it read the data and built the model first)."""
    from fasttune import cli
    from fasttune.train import loop

    def tokenized(*a, **k):
        raise AssertionError("the data was read before the refusal")

    monkeypatch.setattr(loop, "_data", tokenized)
    out = ["--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--training.device", "cpu"]
    assert cli.main(["train", "--model.preset", "micro", "--model.memory", "every:4", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --model.memory=every:4: every:4 recomputes one decoder layer")
    assert "this model has 2; pass --model.memory every:2, full " in err


def test_the_loss_chunk_is_at_most_the_micro_batch():
    small, large = estimate(_setup(256), "none"), estimate(_setup(2048), "none")  # 1b's chunk is 2048 tokens
    head_grad = 32000 * 2048 * (4.0 + 2.0)  # the fp32 head-gradient accumulator, the bf16 matmul output added to it
    assert (large.loss - head_grad) == 8 * (small.loss - head_grad)


def test_memory_option_validates():
    assert ModelConfig(memory="every:1").memory == "full"
    for bad in ("sometimes", "every:0", "every:x", "EVERY:2", "ops,full", "every:²", "every:٣", "every: 2"):
        with pytest.raises(ConfigError, match="model.memory"):
            ModelConfig(memory=bad)
    assert ModelConfig(gradient_checkpointing=True, memory="full").memory == "full"
    for plan in ("none", "ops", "every:2"):  # it means `full`: another plan beside it is a contradiction, not ignored
        with pytest.raises(ConfigError, match="gradient_checkpointing means --model.memory full"):
            ModelConfig(gradient_checkpointing=True, memory=plan)


def test_training_run_logs_the_plan(tmp_path, caplog):
    cfg = tiny_config(tmp_path, max_steps=2, save_every=0, eval_every=0)
    cfg.model.memory = "every:2"
    with caplog.at_level("INFO", logger="fasttune"):
        result = train(cfg)
    assert "memory plan: every:2" in caplog.text and "chunked loss" in caplog.text
    assert "training: pure fp32 weights and optimizer state; adamw; memory plan every:2" in caplog.text
    assert result.last_loss is not None and result.last_loss == result.last_loss


def test_a_cpu_run_that_would_not_fit_the_machines_ram_stops_before_its_first_step(tmp_path, caplog, monkeypatch):
    """On a CPU the plan is checked against the RAM the system can give (plus the weights already held): `auto`
    recomputes where `none` would not fit, and what fits no plan stops with the estimate, naming the RAM. It started
    and left the system to kill it (quick at --data.max-length 1000000: 159 GiB predicted on a 23 GiB machine)."""
    from fasttune.train import free, memory

    cfg = tiny_config(tmp_path, max_steps=1, save_every=0, eval_every=0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=256, micro_batch_size=8))
    seen, choose = [], memory._choose_with_liger_norms
    monkeypatch.setattr(memory, "_choose_with_liger_norms", lambda c, m, r, st, free: seen.append(st) or
                        choose(c, m, r, st, free))  # fmt: skip
    with caplog.at_level("INFO", logger="fasttune"):
        train(cfg)
    assert "memory plan: none (auto, " in caplog.text and " GiB of RAM); predicted peak" in caplog.text
    st = seen[0]
    assert st.host and estimate(st, "none").fixed == 0.0
    none, full = (estimate(st, p).total for p in ("none", "full"))
    assert full < 0.9 * none
    ram = [0.0]
    monkeypatch.setattr(free, "available_ram", lambda: ram[0])
    held = st.params * st.param_bytes  # host_free adds the weights the process holds
    ram[0] = 0.95 * none / HEADROOM - held  # `none` does not fit, `full` does
    caplog.clear()
    with caplog.at_level("INFO", logger="fasttune"):
        assert train(dataclasses.replace(cfg, output_dir=str(tmp_path / "b"))).last_loss is not None
    assert "memory plan: full (auto, 0.0 GiB of RAM)" in caplog.text  # the least recomputation that fits
    ram[0] = 0.5 * full / HEADROOM - held
    with pytest.raises(FasttuneError, match="of RAM this machine can give .*; try .*a GPU"):
        train(dataclasses.replace(cfg, output_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_estimate_is_per_gpu_under_torchrun():
    one = estimate(_setup(8192), "ops")
    fsdp = estimate(Setup(**{**_setup(8192).__dict__, "shards": 4}), "ops")
    ddp = estimate(Setup(**{**_setup(8192).__dict__, "ddp": True}), "ops")
    assert fsdp.weights == one.weights / 4 and fsdp.optimizer == one.optimizer / 4
    assert fsdp.activations == one.activations  # every rank runs its own micro-batches
    assert ddp.total == pytest.approx(one.total + one.grads)  # DDP's buckets: one more copy of the gradients


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_planner_counts_the_lora_forward_that_runs(tmp_path):
    """A LoRA model is estimated with lora_bytes of fasttune's forward; with lora.dropout > 0 (peft's own forward
    runs) and fp32 adapters on a bf16 base, with peft's upcasts; a model without LoRA without either."""
    import dataclasses

    from fasttune.config import LoraConfig
    from fasttune.model.lora import apply_lora
    from fasttune.train.estimate import fp32_layers, setup_of

    cfg = tiny_config(tmp_path)
    for dtype, dropout, upcast in (
        (torch.bfloat16, 0.0, False),
        (torch.bfloat16, 0.1, True),
        (torch.float32, 0.1, False),
    ):
        lora = LoraConfig(enabled=True, rank=8, alpha=16, dropout=dropout)
        model = apply_lora(build_preset("micro", VOCAB, "sdpa", dtype), lora)
        st = setup_of(dataclasses.replace(cfg, lora=lora), model, liger=False, chunked=True)
        assert (st.lora_rank, st.lora_upcast) == (8, upcast)
        plain = Setup(**{**st.__dict__, "lora_rank": 0, "lora_upcast": False})
        wide, shape = (2, fp32_layers(st.shape)) if dtype == torch.float32 else (1, st.shape)  # fp32 activations
        extra = wide * lora_bytes(shape, "none", 8, upcast=upcast) * st.tokens * st.shape.layers
        assert estimate(st, "none").total == pytest.approx(estimate(plain, "none").total + extra)
    st = setup_of(cfg, build_preset("micro", VOCAB, "sdpa", torch.bfloat16), liger=False, chunked=True)
    assert (st.lora_rank, st.lora_upcast) == (0, False)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_counts_each_parameter_at_its_own_dtype(tmp_path):
    """Under LoRA the first parameter is the bf16 frozen base, the adapters fp32: their weights, gradients and AdamW
    moments are counted at 4 bytes, the frozen weights at 2 (Qwen3-30B-A3B's ~1B expert adapters were counted 2 GB
    low per copy). The estimate's parts against the model's own tensors, on the CPU (no autocast copies)."""
    from fasttune.config import LoraConfig
    from fasttune.model.lora import apply_lora
    from fasttune.train.estimate import setup_of

    cfg = tiny_config(tmp_path)
    lora = LoraConfig(enabled=True, rank=8, alpha=16)
    model = apply_lora(build_preset("micro", VOCAB, "sdpa", torch.bfloat16), lora)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trained} == {torch.float32} and next(model.parameters()).dtype == torch.bfloat16
    est = estimate(setup_of(dataclasses.replace(cfg, lora=lora), model, liger=False, chunked=True), "none")
    assert est.grads == sum(p.numel() * p.element_size() for p in trained)
    assert est.optimizer == 2 * est.grads  # AdamW: two fp32 moments
    assert est.weights == sum(p.numel() * p.element_size() for p in model.parameters())


def test_the_run_says_its_precision_optimizer_and_plan(tmp_path):
    from fasttune.train.loop import describe_training

    cfg = tiny_config(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.AdamW(model.parameters(), fused=False)
    assert describe_training(cfg, model, torch.bfloat16, opt, "none") == (
        "fp32 master weights under bf16 autocast; adamw; memory plan none"
    )
    model.to(torch.bfloat16)[0].requires_grad_(False)  # a frozen bf16 base ...
    model[1].float()  # ... and fp32 adapters
    assert describe_training(cfg, model, None, opt, "full").startswith("fp32 adapters on a bf16 frozen base; adamw")


def test_the_estimate_counts_fsdp2s_gathered_weights_and_no_head_gradient_under_lora(monkeypatch):
    """docs/BENCHMARKS.md "FSDP2 start-up" (2 x H200): LoRA r16 on all linear layers of the Llama-3.1-8B shape, bf16
    base, --training.fsdp on 2 ranks, 2048 tokens per micro-batch, plan full: 12.53 GiB measured per GPU. The
    estimate counts what FSDP2 holds gathered (the root unit with the 128k-vocabulary embeddings and head, and two
    decoder layers) and no fp32 gradient accumulator for the frozen head (it said 11.4 GiB before, 9% low)."""
    from fasttune.config import get_experiment
    from fasttune.model import norm
    from fasttune.model.lora import apply_lora
    from fasttune.train.estimate import setup_of

    cfg = get_experiment("lora")
    cfg.training.fsdp = True
    monkeypatch.setenv("WORLD_SIZE", "2")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(preset_config("llama-3.1-8b", 128256), dtype=torch.bfloat16)
    model = apply_lora(model, cfg.lora)
    norm.apply(model)
    st = setup_of(cfg, model, liger=False, chunked=True, tokens=2048)
    head, layer = 2 * 128256 * 4096 + 4096, sum(p.numel() for p in model.base_model.model.model.layers[0].parameters())
    assert (st.shards, st.head_trainable, st.gathered) == (2, False, (head + 2 * layer) * 2)
    predicted = estimate(st, "full").total / GiB
    assert 12.53 * 0.95 <= predicted <= 12.53 * 1.1, predicted
    trained = setup_of(get_experiment("sft"), AutoModelForCausalLM.from_config(preset_config("micro", VOCAB)),
                       liger=False, chunked=True)  # fmt: skip
    assert trained.head_trainable and trained.gathered == 0.0  # one process, a full fine-tune


def test_the_no_fit_advice_prices_lora_without_a_head_gradient():
    """The --lora.enabled what-if of the no-fit advice is priced as a LoRA run is (a frozen head: no fp32 gradient
    accumulator in the loss, 2 GiB at the 8B shape): where only that estimate fits, the advice offers LoRA."""
    from fasttune.train.memory import state_changes

    eight_b = Setup(Shape.of(preset_config("llama-3.1-8b", 128256)), 8_030_261_248, 8_030_261_248, 2, 4.0, 2048)
    change = next(c for text, c in state_changes(eight_b) if "--lora.enabled" in text)
    lora = estimate(Setup(**{**eight_b.__dict__, **change}), "full")
    assert lora.loss < 0.5 * GiB and not Setup(**{**eight_b.__dict__, **change}).head_trainable
    free = (lora.total + 0.5 * GiB) / HEADROOM  # LoRA fits, with 0.5 GiB to spare: less than its head would take
    with pytest.raises(FasttuneError) as e:
        choose_plan("full", eight_b, free)
    assert "--lora.enabled" in str(e.value)


def test_fsdp2s_gathered_weights_count_its_largest_block():
    """DeepSeek-V3's first layers are dense and the others MoE: FSDP2 gathers an MoE layer (the largest block) and
    the one after it, not two dense ones (tests/test_distributed.py checks what FSDP2 shards)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from fasttune.model.build import decoder_blocks
    from fasttune.train.estimate import gathered

    config = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=256, moe_intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                              topk_group=1)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    blocks = [sum(p.numel() for p in b.parameters()) for b in decoder_blocks(model)]
    assert blocks[0] < blocks[1] == blocks[2]
    root = sum(p.numel() for p in model.parameters()) - sum(blocks)
    assert gathered(model, 2) == (root + 2 * blocks[1]) * 2


def test_an_activation_with_parameters_is_measured_where_the_run_is():
    """XIELU (Apertus) has parameters: on a layer built on the meta device (an FSDP2 rank but the first) or on the
    CPU for a GPU run it is measured on a copy on the run's device, not left unmeasured."""
    from transformers.activations import XIELUActivation

    from fasttune.model.layout import activation_keeps, mlp_layout

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Module()
            self.mlp.up_proj, self.mlp.down_proj = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
            self.mlp.act_fn = XIELUActivation(dtype=torch.bfloat16)

    want = activation_keeps(XIELUActivation(dtype=torch.bfloat16))
    assert want is not None
    with torch.device("meta"):
        meta = Layer()
    assert mlp_layout(meta, device=torch.device("cpu"))["act_elem"] == want


def _apply_advice(st: Setup, msg: str) -> list[tuple[str, Setup, str]]:
    """(advice, the Setup it makes, the plan it names) for each alternative after "try" in a no-fit message (or a
    host's: "free host memory, or try ...")."""
    import re

    from fasttune.train.memory import state_changes

    out = []
    alts, depth, start, text = [], 0, 0, re.split(r"(?:;|, or) try ", msg, maxsplit=1)[1]
    for i, ch in enumerate(text):  # " or " between alternatives, not inside their parentheses
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and text.startswith(" or ", i):
            alts.append(text[start:i])
            start = i + 4
    for alt in [*alts, text[start:]]:
        tokens = re.search(r"about (\d+) tokens per micro-batch", alt)
        plan = re.search(r"--model.memory (\S+)", alt)
        changed = {"tokens": int(tokens[1]), "accumulating": True} if tokens else {}  # grad-accum raised
        changed |= next((c for text, c in state_changes(st) if alt.startswith(text)), {})
        if not changed and not alt.startswith("--model.memory"):
            continue  # "a smaller model, or several GPUs": nothing to apply
        out.append((alt, Setup(**{**st.__dict__, **changed}), plan[1] if plan else "auto"))
    return out


@pytest.mark.parametrize("free", [16, 14, 12, 8])
def test_each_no_fit_advice_fits_when_applied_alone(free):
    """Every alternative a no-fit message offers, applied as written (and nothing else), makes the estimate fit: with
    16 GiB free the docs' 1B example offered 8-bit AdamW and LoRA as if either alone would do, but at its 131072
    tokens per micro-batch neither fits (19.6 and 17.3 GiB for 14.7 usable); they fit with fewer tokens, said now."""
    st = Setup(**{**_setup(131072).__dict__, "fused_mlp": True, "lean_norm": True})
    with pytest.raises(FasttuneError) as e:
        choose_plan("auto", st, free * GiB)
    msg = str(e.value)
    advice = _apply_advice(st, msg)
    assert len(advice) >= 2 and any("adamw_8bit" in alt for alt, _, _ in advice), msg
    for alt, changed, plan in advice:
        est = choose_plan(plan, changed, free * GiB)  # raises if the advice were false
        assert est.total <= free * GiB * HEADROOM, alt
