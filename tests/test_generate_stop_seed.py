"""Stop strings (`--stop`) and per-sample sampling seeds, on the HF path and the fast path (its fused decoder runs on
the CPU), against plain HF `generate` one prompt at a time (greedy) or the same generation without stop strings, cut
where lm-evaluation-harness's `until` cuts it; sampled answers against the same prompts at --batch-size 1."""

import json
import time
from pathlib import Path

import pytest
import torch
from fixtures.tiny_tokenizer import build_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.cli import main
from fasttune.generate import generate as gen_module
from fasttune.generate.fast import Generator
from fasttune.generate.generate import generate_ids
from fasttune.generate.sampling import draw, row_uniform, sample_key
from fasttune.generate.stops import StopStream, StopStrings
from fasttune.model.build import preset_config

NEW = 40
PROMPTS = ["Natalia sold clips", "Add the numbers.", "The capital of France is", "def f():", "Hello there, how"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A micro Llama with large random weights: its greedy text is varied (a small init repeats one token), and no
    chat template, so prompts are sent as is after BOS."""
    path = tmp_path_factory.mktemp("chaotic") / "model"
    tok = build_tiny_tokenizer(chat_template=None, bos="<s>")
    config = preset_config("micro", len(tok), max_position_embeddings=256)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def _hf_one_at_a_time(model, tok, prompts: list[list[int]]) -> list[list[int]]:
    """Reference: plain HF greedy generate per prompt, no stop string: the new tokens."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        out.append(y[0, len(ids) :].tolist())
    return out


def _until(text: str, stops: list[str]) -> str:
    """lm-evaluation-harness: `for term in until: text = text.split(term)[0]`."""
    for term in stops:
        text = text.split(term)[0]
    return text


def _stops_for(texts: list[str]) -> list[str]:
    """Two stop strings from the middle of the reference texts (printable ASCII), checked to end some answers early
    and to leave one whole, so a test with them cannot pass without stopping."""
    stops = []
    for text in texts:
        for at in range(len(text) // 3, len(text) - 2):
            piece = text[at : at + 2]
            if piece.isascii() and piece.isprintable() and piece.strip() == piece:
                stops.append(piece)
                break
        if len(stops) == 2:
            break
    cut = [_until(t, stops) != t for t in texts]
    assert sum(cut) >= 2 and not all(cut), (stops, texts)
    return stops


def _first_stop_tokens(tok, new: list[int], stops: list[str]) -> int:
    """Reference count: the fewest new tokens whose text holds a stop string (one prefix at a time)."""
    return next(n for n in range(1, len(new) + 1) if _until(tok.decode(new[:n]), stops) != tok.decode(new[:n]))


@pytest.fixture(scope="module")
def reference(loaded):
    model, tok = loaded
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    new = _hf_one_at_a_time(model, tok, prompts)
    texts = [tok.decode(n, skip_special_tokens=True) for n in new]
    return prompts, new, texts, _stops_for(texts)


def test_generate_prompts_stop_strings_cut_answers_as_hf_then_until(model_dir, loaded, reference, tmp_path):
    """`generate --prompts --stop A --stop B` in batches (left padding) on the HF path: each completion is plain HF's
    one-at-a-time answer cut before its first stop string; completions.jsonl says which stop string ended it and
    counts the tokens up to it."""
    _, tok = loaded
    _, new, texts, stops = reference
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(model_dir), "--prompts", str(file), "--output", str(out), "--batch-size",
            "3", "--max-new-tokens", str(NEW), "--stop", stops[0], "--stop", stops[1]]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["completion"] for r in rows] == [_until(t, stops) for t in texts]
    for r, n, t in zip(rows, new, texts, strict=True):
        if _until(t, stops) != t:
            assert r["finished"] and r["stop"] in stops and t[len(r["completion"]) :].startswith(r["stop"])
            assert r["new_tokens"] == _first_stop_tokens(tok, n, stops) < NEW
        else:
            assert r["stop"] is None and r["new_tokens"] == len(n)


class _Counter:
    """Counts forward passes (prefill and decode steps) of a module or a fused decoder."""

    def __init__(self, target, name: str = "forward"):
        self.calls, inner = 0, getattr(target, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        setattr(target, name, counted)


@pytest.mark.parametrize("path", ["hf", "fast"])
def test_batch_ends_when_every_row_has_stopped(loaded, reference, path):
    """A row stops generating at its stop string and the batch ends when every row has: as many forward passes as
    the latest row needs, not max_new_tokens; the answers are the reference's cut before the stop string (the fast
    path's reference: itself without stop strings)."""
    model, tok = loaded
    prompts, new, texts, _ = reference
    stops = [texts[0][3:5], texts[1][4:6], texts[2][2:4], texts[3][5:7], texts[4][3:5]]  # every row stops early
    engine = Generator(model) if path == "fast" else None
    free = [g.text for g in generate_ids(model, tok, prompts, max_new_tokens=NEW, engine=engine)] if engine else texts
    counter = _Counter(engine.decoder if engine else model)
    gens = generate_ids(model, tok, prompts, max_new_tokens=NEW, stop=stops, engine=engine)
    assert [g.text for g in gens] == [_until(t, stops) for t in free]
    assert all(g.finished and g.stop for g in gens)
    latest = max(g.new_tokens for g in gens)
    assert latest < NEW - 10
    # HF checks every step; the fast path at its host syncs (every check_every = 16 steps)
    assert counter.calls == latest if path == "hf" else counter.calls <= -(-latest // 16) * 16


@pytest.mark.parametrize("path", ["hf", "fast"])
def test_streamed_text_ends_before_the_stop_string(loaded, reference, path):
    model, tok = loaded
    prompts, _, texts, stops = reference
    engine = Generator(model) if path == "fast" else None
    for ids, text in zip(prompts, texts, strict=True):
        free = generate_ids(model, tok, [ids], max_new_tokens=NEW, engine=engine)[0].text if engine else text
        seen: list[str] = []
        g = generate_ids(model, tok, [ids], max_new_tokens=NEW, stop=stops, on_text=seen.append, engine=engine)[0]
        assert "".join(seen) == g.text == _until(free, stops)


def test_stream_holds_back_what_may_start_a_stop_string():
    seen: list[str] = []
    stream = StopStream(StopStrings(None, ["###", "\n\n"]), seen.append)
    for piece in ["ab#", "#", "c\n", "d", "\n", "\nxyz"]:
        stream.write(piece)
    stream.close()
    assert seen == ["ab", "##c", "\nd"]  # "#" and "##" waited for what follows; "d\n\n" is a stop: nothing after
    seen.clear()
    stream = StopStream(StopStrings(None, ["###"]), seen.append)
    stream.write("x##")
    stream.close()
    assert seen == ["x", "##"]  # the end of the answer: what was held back is sent


def _sampled(model_dir: Path, tmp_path: Path, batch_size: int, seed: int = 3) -> list[str]:
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS * 2))  # the same prompt twice: two samples
    out = tmp_path / f"out-{batch_size}-{seed}.jsonl"
    assert main(["generate", "--checkpoint", str(model_dir), "--prompts", str(file), "--output", str(out),
                 "--batch-size", str(batch_size), "--max-new-tokens", "24", "--temperature", "1.0", "--top-p", "0.95",
                 "--seed", str(seed)]) == 0  # fmt: skip
    return [json.loads(x)["completion"] for x in out.read_text().splitlines()]


@pytest.mark.parametrize("path", ["hf", "fast"])
def test_sampled_answers_do_not_depend_on_the_batch_size(model_dir, tmp_path, monkeypatch, path):
    """Each prompt samples from (--seed, its index in the file): --batch-size 1 and 4 give the same answers. A seed
    per batch (seed + its first position) gave others with every batch size."""
    if path == "fast":  # the fused decoder on the CPU, as on a GPU without graphs
        monkeypatch.setattr(gen_module, "fast_engine", lambda model, graphs=None: Generator(model))
    one = _sampled(model_dir, tmp_path, 1)
    assert _sampled(model_dir, tmp_path, 4) == one
    assert one[: len(PROMPTS)] != one[len(PROMPTS) :]  # the same prompt at another index: another sample
    assert _sampled(model_dir, tmp_path, 4, seed=4) != one


def test_fast_path_and_hf_draw_alike(loaded, reference):
    """The same keys and the same distribution give the same tokens on both paths (float32 logits agree closely)."""
    model, tok = loaded
    prompts = reference[0]
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=11, indices=[5, 1, 7, 2, 0])
    hf = generate_ids(model, tok, prompts, **kwargs)
    fast = generate_ids(model, tok, prompts, **kwargs, engine=Generator(model))
    assert [g.text for g in fast] == [g.text for g in hf]
    greedy = generate_ids(model, tok, prompts, max_new_tokens=24)
    assert [g.text for g in hf] != [g.text for g in greedy]


def test_top_p_without_a_temperature_says_it_does_nothing(caplog):
    """--top-p 0.9 alone is greedy (--temperature defaults to 0; vLLM's to 1): a warning says so, as HF generate's
    does for top_p without do_sample; it was silent."""
    from fasttune.cli import parse

    for command in (["generate", "--prompt", "p"], ["chat"]):
        caplog.clear()
        parse([*command, "--checkpoint", "c", "--top-p", "0.9"])
        assert "--top-p 0.9 does nothing at --temperature 0" in caplog.text
        caplog.clear()
        parse([*command, "--checkpoint", "c", "--top-p", "0.9", "--temperature", "0.7"])
        assert "--top-p" not in caplog.text


def test_eval_summary_names_the_top_k_sampled_with(model_dir, tmp_path):
    """The summary holds the settings that reproduce sampled answers: top-k too, which is the model's (HF's 50 when
    its generation config sets none), not an option."""
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": "Add 2 and 3.", "completion": " 5"}) + "\n")
    assert main(["eval", "--checkpoint", str(model_dir), "--data", str(data), "--generate", "--max-new-tokens", "4",
                 "--temperature", "0.7", "--output-dir", str(tmp_path / "ev")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["top_k"] == 50


@pytest.mark.parametrize("path", ["hf", "fast"])
def test_sampling_keeps_hf_top_k_when_the_generation_config_sets_none(loaded, reference, path, monkeypatch):
    """HF `generate(do_sample=True)` samples among the 50 likeliest tokens when the model's generation config sets
    no top_k (transformers 5 leaves it None there and fills in 50): so does fasttune. At a temperature that makes the
    distribution near uniform, no drawn token is outside each step's top 50 (fasttune drew from all 300)."""
    model, tok = loaded
    assert model.generation_config.top_k is None and model.config.vocab_size > 250
    prompts = reference[0]
    drawn, result = [], gen_module._result
    monkeypatch.setattr(gen_module, "_result", lambda new, *a: drawn.append(new) or result(new, *a))
    engine = Generator(model) if path == "fast" else None
    generate_ids(model, tok, prompts, max_new_tokens=12, temperature=100.0, seed=3, engine=engine)
    ranks = []
    for ids, new in zip(prompts, drawn, strict=True):
        new = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
        with torch.no_grad():
            logits_NV = model(torch.tensor([ids + new])).logits[0, len(ids) - 1 : -1]
        ranks += (logits_NV > logits_NV.gather(1, torch.tensor(new)[:, None])).sum(1).tolist()
    assert len(ranks) >= 30 and max(ranks) < 50, ranks


def test_draw_follows_the_distribution():
    probs_V = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    keys_B = torch.tensor([sample_key(1, i) for i in range(50_000)])
    picked = draw(probs_V.expand(len(keys_B), -1), row_uniform(keys_B, 3))
    freq = torch.bincount(picked, minlength=5) / len(keys_B)
    assert torch.allclose(freq, probs_V, atol=0.01) and freq[1] == freq[4] == 0
    assert int(draw(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([1.0]))) == 1  # never a token of probability 0


def test_eval_stops_alpaca_answers_at_the_next_instruction(model_dir, tmp_path):
    """eval --generate: Alpaca prompts stop at a next `### Instruction:` unless --stop says otherwise (or
    --no-default-stop: none); other formats have no default stop string. The summary records what was used."""
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}) + "\n")
    plain = tmp_path / "pc.jsonl"
    plain.write_text(json.dumps({"prompt": "Add 2 and 3.", "completion": " 5"}) + "\n")
    for data, extra, expected in [(alpaca, [], ["### Instruction:"]), (alpaca, ["--stop", "\n"], ["\n"]),
                                  (alpaca, ["--no-default-stop"], []), (plain, [], [])]:  # fmt: skip
        out = tmp_path / f"ev-{len(list(tmp_path.iterdir()))}"
        assert main(["eval", "--checkpoint", str(model_dir), "--data", str(data), "--generate", "--max-new-tokens",
                     "8", "--output-dir", str(out), *extra]) == 0  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop"] == expected and summary["top_k"] is None  # greedy: no top-k
        row = json.loads((out / "completions.jsonl").read_text())
        assert "stop" in row and all(s not in row["completion"] for s in expected)


def test_eval_generate_stop_strings_cut_as_until(model_dir, tmp_path):
    """eval --generate --stop: each answer is the one without stop strings (plain HF's, test_generate_batches) cut
    before its first stop string; completions.jsonl and the summary say which and how many ended there."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": " 5"}) + "\n" for p in PROMPTS))

    def run(name: str, *extra: str) -> list[dict]:
        assert main(["eval", "--checkpoint", str(model_dir), "--data", str(data), "--generate", "--batch-size", "3",
                     "--max-new-tokens", str(NEW), "--output-dir", str(tmp_path / name), *extra]) == 0  # fmt: skip
        return [json.loads(x) for x in (tmp_path / name / "completions.jsonl").read_text().splitlines()]

    free = [r["completion"] for r in run("free")]
    stops = _stops_for(free)
    rows = run("stopped", "--stop", stops[0], "--stop", stops[1])
    assert [r["completion"] for r in rows] == [_until(t, stops).strip() for t in free]
    assert [r["stop"] is not None for r in rows] == [_until(t, stops) != t for t in free]
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["stop"] == stops and summary["ended_at_stop_string"] == sum(r["stop"] is not None for r in rows)


def test_chat_reply_ends_before_the_stop_string(loaded, reference, capsys):
    """`chat --stop`: the streamed reply is the one without stop strings, cut before the first (raw: no template)."""
    from fasttune.generate.chat import chat_loop

    model, tok = loaded
    _, _, texts, stops = reference
    assert _until(texts[0], stops) != texts[0]
    for stop, expected in [((), texts[:2]), (tuple(stops), [_until(t, stops) for t in texts[:2]])]:
        lines = iter(PROMPTS[:2])

        def read(prompt: str, lines=lines) -> str:
            if (line := next(lines, None)) is None:
                raise EOFError  # Ctrl-D
            return line

        assert chat_loop(model, tok, raw=True, max_new_tokens=NEW, stop=stop, read=read) == 0
        assert capsys.readouterr().out == "".join(t + "\n" for t in expected) + "\n"


class _TimedEngine:
    """The fast path as generate_ids calls it, standing in on the CPU: HF's greedy tokens, a prompt pass of 0.2 s and,
    on its first call, 0.3 s counted as graph capture (as `Generator` counts them)."""

    capture_seconds = 0.0
    prefill_seconds = 0.0

    def __init__(self, model):
        self.model = model

    def generate(self, ids_BP, mask_BP, *, max_new_tokens, eos_token_id, pad_token_id, **_):
        time.sleep(0.2)
        self.prefill_seconds = 0.2
        if not self.capture_seconds:
            time.sleep(0.3)
            self.capture_seconds = 0.3
        return self.model.generate(input_ids=ids_BP, attention_mask=mask_BP, max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)  # fmt: skip


def test_a_generation_reports_decoding_apart_from_the_prompt_pass_and_graph_capture(loaded):
    """An H200 sample of 64 tokens after training said 121 tok/s where decoding ran ~840: the first call's prompt pass
    (CUDA's lazy start-up) and CUDA graph capture (once per model) counted as decoding. A single generation's speed
    keeps them apart; a later call has no capture."""
    model, tok = loaded
    engine = _TimedEngine(model)
    ids = tok("def f(x):")["input_ids"]
    first, again = (generate_ids(model, tok, [ids], max_new_tokens=8, engine=engine)[0] for _ in range(2))
    assert first.text == again.text == generate_ids(model, tok, [ids], max_new_tokens=8)[0].text
    assert first.new_tokens == 8 and (first.capture_seconds, again.capture_seconds) == (pytest.approx(0.3), 0.0)
    decoding = 7 / (first.seconds - 0.5)  # the prompt pass gives the first token
    assert first.speed() == (f"{decoding:,.1f} tok/s decoding; prompt 0.20 s, CUDA graph capture 0.30 s (a first "
                             "call includes CUDA's start-up)")  # fmt: skip
    assert again.speed().endswith("tok/s decoding; prompt 0.20 s (a first call includes CUDA's start-up)")
    assert decoding > first.tokens_per_s
    hf = generate_ids(model, tok, [ids], max_new_tokens=8)[0]
    assert hf.speed() == f"{hf.tokens_per_s:,.1f} tok/s"
