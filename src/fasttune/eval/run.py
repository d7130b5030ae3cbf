"""Evaluate a checkpoint on any data training reads: loss and perplexity on the tokens training trains (responses;
every token of plain text, split into pieces as training splits it), and with generation the answers scored by exact
match (and the final number, for math data such as GSM8K).

    fasttune eval --checkpoint runs/sft --data test.jsonl --generate --output-dir runs/sft/eval

The data is read and tokenized exactly as training reads it (any format; the loss covers the tokens
training would train: responses, prompts too with --train-on-prompt (by default when the run named trained on them),
or every token of plain text). Written to --output-dir: completions.jsonl (one line
per sample: prompt, reference, completion, scores) and summary.json; the summary is also printed as a table.
The same generation scoring run on a held-out slice during training is fasttune.eval.in_training.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fasttune.config.base_config import shown
from fasttune.data.packing import IGNORE, collate_padded
from fasttune.data.sample import Sample
from fasttune.data.sft import tokenize_records
from fasttune.errors import ConfigError, DataError
from fasttune.eval.cli import EvalArgs
from fasttune.eval.report import output_files, report
from fasttune.eval.score import Example, score, split_sample, summarize_scores
from fasttune.model.context import context_length
from fasttune.streams import printed_above

log = logging.getLogger("fasttune")

ALPACA_STOP = "### Instruction:"


@torch.no_grad()
def response_loss(model, samples: list[Sample], pad_id: int, batch_size: int) -> dict:
    """Summed cross-entropy over the trained tokens (labels != -100, next-token shifted as in HF), per batch of
    right-padded samples sorted by length; returns loss (mean per token), perplexity, token counts and tokens/s."""
    device = next(model.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    loss_sum, targets, tokens = 0.0, 0, 0
    t0 = time.perf_counter()
    live = sys.stderr.isatty()  # no bar when stderr is redirected (as in training): its redraws would fill the file
    bar = tqdm(total=len(samples), desc="loss", unit="sample", file=sys.stderr, leave=False, disable=not live)
    with printed_above(bar):  # a warning meanwhile goes above the bar, not into it
        for lo in range(0, len(order), batch_size):
            batch = [samples[i] for i in order[lo : lo + batch_size]]
            b = {k: v.to(device) for k, v in collate_padded(batch, pad_id).items()}  # right-padded, as training's
            ids_BL, labels_BL, mask_BL = b["input_ids"], b["labels"], b["attention_mask"]
            logits_BLV = model(input_ids=ids_BL, attention_mask=mask_BL, use_cache=False).logits
            target_BL = labels_BL[:, 1:]
            for r in range(len(batch)):  # row by row: a float32 copy of (B, L, V) logits is GBs at a 128k vocabulary
                loss_sum += float(F.cross_entropy(logits_BLV[r, :-1].float(), target_BL[r], ignore_index=IGNORE,
                                                  reduction="sum"))  # fmt: skip
            targets += int((target_BL != IGNORE).sum())
            tokens += int(mask_BL.sum())
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tok/s")
    bar.close()
    seconds = time.perf_counter() - t0
    loss = loss_sum / targets if targets else None
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if loss is not None else None,
            "target_tokens": targets, "tokens": tokens,
            "loss_tokens_per_s": tokens / seconds if seconds else None}  # fmt: skip


def generate_answers(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (),
                     engine=None, progress: bool = True) -> tuple[list[dict], dict]:  # fmt: skip
    """Generate an answer per example in batches; returns per-example rows and the summary (scores, tokens/s).
    Sampling draws example i's tokens from (seed, i) alone; `stop`: stop strings (answers end before the first)."""
    from fasttune.generate.generate import generate_ids, length_batches

    rows: dict[int, dict] = {}
    new_tokens, seconds = 0, 0.0
    live = progress and sys.stderr.isatty()  # no bar in a redirected stderr (as in training)
    bar = tqdm(total=len(examples), desc="generate", unit="sample", file=sys.stderr, disable=not live)
    prompts = [ex.prompt_ids for ex in examples]
    with printed_above(bar):  # a warning meanwhile goes above the bar, not into it
        for _, idx, budget in length_batches(model, prompts, batch_size, max_new_tokens):
            gens = generate_ids(model, tokenizer, [examples[i].prompt_ids for i in idx], max_new_tokens=budget,
                                temperature=temperature, top_p=top_p, seed=seed, indices=idx, stop=stop,
                                engine=engine)  # fmt: skip
            for i, g in zip(idx, gens, strict=True):
                ex = examples[i]
                rows[i] = {"index": i if ex.record is None else ex.record,  # the record's position in the data
                           "prompt": tokenizer.decode(ex.prompt_ids),  # as the model saw it: chat markers kept
                           "reference": ex.reference, "completion": g.text.strip(), "new_tokens": g.new_tokens,
                           "finished": g.finished, "stop": g.stop, **score(g.text.strip(), ex.reference)}  # fmt: skip
            new_tokens += sum(g.new_tokens for g in gens)
            seconds += gens[0].seconds
            bar.update(len(idx))
            bar.set_postfix_str(f"{new_tokens / seconds:,.0f} tok/s" if seconds else "")
    bar.close()
    ordered = [rows[i] for i in range(len(examples))]
    summary = {**summarize_scores(ordered), "generated_samples": len(ordered),
               "cut_at_max_new_tokens": sum(not r["finished"] for r in ordered),
               "ended_at_stop_string": sum(r["stop"] is not None for r in ordered), "generated_tokens": new_tokens,
               "generate_tokens_per_s": new_tokens / seconds if seconds else None}  # fmt: skip
    return ordered, summary


def _text_pieces(samples: list[Sample], max_length: int | None, context: int | None,
                 overlong: str | None = None) -> tuple[list[Sample], str]:  # fmt: skip
    """Plain text longer than max_length (else the model's context) tokens handled as training handles it at
    data.max_length (`overlong`: data.overlong; auto splits): split into pieces of it (every token is scored but each
    piece's first, none left out as too long), truncated to it, or dropped; with the policy applied. A model that
    names no context needs max_length."""
    piece = max_length or context
    if not piece:  # Bloom (ALiBi): a whole text in one forward pass, unlike training's pieces (and GBs of memory)
        raise ConfigError("plain text needs --max-length here: the model's config names no context (no "
                          "max_position_embeddings), so there is no length to split the texts at as training splits "
                          "them; pass --max-length N (the run's data.max_length)")  # fmt: skip
    from fasttune.data.pipeline import DataSummary, fit_length, overlong_policy

    mode = overlong_policy(overlong or "auto", "text", piece)
    counts = DataSummary("", "")
    pieces = fit_length(samples, piece, mode, counts)
    why = "--max-length" if max_length else "the model's context; --max-length sets it"
    if counts.split:
        log.info("plain text: %d of %d texts split into pieces of %d tokens (%s), %d pieces scored",
                 counts.split, len(samples), piece, why, len(pieces))  # fmt: skip
    elif counts.truncated or counts.dropped:
        done = "truncated to" if counts.truncated else "left out as longer than"
        log.info("plain text: %d of %d texts %s %d tokens (%s; overlong %s, as training)",
                 counts.truncated or counts.dropped, len(samples), done, piece, why, mode)  # fmt: skip
    return pieces, mode


def _tokenized(a: EvalArgs, records: list[dict], fmt: str, tokenizer, prompts: bool,
               names: Callable[[int], str] | None = None) -> list[Sample]:  # fmt: skip
    """`records` as training tokenizes them (`prompts`: with --train-on-prompt), each sample numbered by record;
    `names`: how errors name a record (_read's)."""
    origins: list[int] = []
    samples = tokenize_records(records, fmt, tokenizer, train_on_prompt=prompts, source=shown(a.data),
                               origins=origins, names=names)  # fmt: skip
    if fmt != "text":
        _number_records(samples, origins)
    return samples


Read = tuple[list[dict], str, list]
"""_read's: --data's records, their format, and where they came from, file by file (formats.load_paths' places:
how errors name a record, formats.record_names, and completions.jsonl's file and file_index)."""


def _read(a: EvalArgs) -> Read:
    """(--data's records, up to --limit; their format; their places), read before the model loads: a data error (a
    missing field, an empty file, a folder of several splits) is said before minutes of loading, not after."""
    from fasttune.data.formats import load_paths, record_names
    from fasttune.data.records import say_unrendered
    from fasttune.data.sft import say_empty_prompts

    # split=None: never a DatasetDict's train split
    places: list = []
    records, fmt = load_paths(a.data, a.format, option="--format", split=None, field=a.field, places=places)
    records = records[: a.limit]
    say_unrendered(records, fmt, shown(a.data), ("scored", "evaluate"))  # a misspelt 'input' is left out, as training
    say_empty_prompts(records, fmt, shown(a.data), record_names(places))  # a prompt of the template alone: as well
    return records, fmt, places


def _samples(
    a: EvalArgs, tokenizer, context: int | None, prompts: bool = False, read: Read | None = None
) -> tuple[list[Sample], list[Sample], str, tuple[int, int], dict]:
    """(the samples the loss scores, the whole samples --generate answers, the format, (samples the loss leaves out
    as longer than the context, samples with an answer to give --generate leaves out so), what --max-length did to
    supervised samples (summary.json's counts)): supervised samples are whole, or with --max-length cut to it as
    training cuts them. The data is read once. `prompts`: their prompt
    tokens are trained too (--train-on-prompt): --generate answers the prompts of the same records tokenized as
    trained on their responses alone (their tokens differ where the prompt ends inside a token, and a chat template
    may split a conversation by turn), whole, within the context; each side counts what it leaves out. `read`: the
    records as _read gave them (None: read them now)."""
    from fasttune.data.formats import record_names

    records, fmt, places = read or _read(a)
    names = record_names(places)
    if a.overlong not in (None, "auto") and fmt != "text" and not a.max_length:
        raise ConfigError(f"--overlong {a.overlong}: supervised samples are cut at --max-length only, and none is "
                          "given (they are scored whole); pass --max-length N (the run's data.max_length)")  # fmt: skip
    samples = _tokenized(a, records, fmt, tokenizer, prompts, names)
    if not any(map(_scored, samples)):  # training refuses such data as well
        what = "text" if fmt == "text" else "response"
        raise DataError(f"{shown(a.data)}: no sample has a token to score (every {what} is empty), so there is no "
                        f"loss to report; fill in the {what}s")  # fmt: skip
    _check_max_length(a, context)
    applied = {}  # summary.json's overlong: the policy a sample longer than the length met, if any
    if fmt == "text":
        samples, applied["overlong"] = _text_pieces(samples, a.max_length, context, a.overlong)
    kept = [s for s in samples if not context or len(s) <= context]
    whole, answered = samples, kept
    if prompts and a.generate and fmt != "text":
        whole = _tokenized(a, records, fmt, tokenizer, False, names)
        answered = [s for s in whole if not context or len(s) <= context]
    unanswered = sum(s.last_turn for s in whole if context and len(s) > context)  # an answer --generate would give
    too_long = (len(samples) - len(kept), unanswered)
    if fmt != "text" and a.max_length:
        cut, counts = _truncated(a, samples, fmt)
        return cut, answered, fmt, too_long, counts
    if not any(map(_scored, kept)):
        raise DataError(f"{shown(a.data)}: every sample with a response to score is longer than the model's context "
                        f"({context} tokens), and eval scores whole samples only; pass --max-length N to score "
                        "their first N tokens as training does, or shorten the records or split them into "
                        "several")  # fmt: skip
    return kept, answered, fmt, too_long, applied


def _check_max_length(a: EvalArgs, context: int | None) -> None:
    """--max-length over the model's context is refused, as training refuses such a data.max_length: positions past
    it were scored as if the model knew them."""
    if a.max_length and context and a.max_length > context:
        raise ConfigError(f"--max-length {a.max_length} is longer than the model's context ({context} tokens); pass "
                          f"at most {context}")  # fmt: skip


def _truncated(a: EvalArgs, samples: list[Sample], fmt: str) -> tuple[list[Sample], dict]:
    """Supervised samples longer than --max-length handled as training handles them at data.max_length (--overlong:
    truncated, one whose prompt fills it left out; or dropped): the loss is then the validation loss of a run trained
    at that length. With the counts summary.json gives of them."""
    from fasttune.data.pipeline import DataSummary, fit_length, overlong_policy

    counts = DataSummary("", "")
    mode = overlong_policy(a.overlong or "auto", fmt, a.max_length)
    out = fit_length(samples, a.max_length, mode, counts)
    if counts.truncated or counts.no_response:
        log.info("loss: %d of %d samples longer than --max-length %d truncated to it, as training truncates them "
                 "(%d more left out: the prompt alone fills it)", counts.truncated, len(samples), a.max_length,
                 counts.no_response)  # fmt: skip
    if counts.dropped:
        log.info("loss: %d of %d samples longer than --max-length %d left out (overlong drop), as training drops "
                 "them", counts.dropped, len(samples), a.max_length)  # fmt: skip
    if not out:
        raise DataError(f"{shown(a.data)}: no sample has a response token within --max-length {a.max_length} (the "
                        "prompt alone fills it, or the sample was dropped as longer); raise --max-length")  # fmt: skip
    cut = {"overlong": mode, "truncated_to_max_length": counts.truncated,
           "skipped_prompt_fills_max_length": counts.no_response}  # fmt: skip
    return out, cut | ({"dropped_longer_than_max_length": counts.dropped} if mode == "drop" else {})


def _number_records(samples: list[Sample], origins: list[int]) -> None:
    """Each sample's `record`: its record's position in the data (`origins`, as tokenize_records gives them:
    completions.jsonl's index), also when samples are left out later or a conversation trained turn by turn gave a
    sample per assistant turn; `last_turn`: the sample ends with the record's last answer (the one --generate answers,
    as for a conversation rendered whole)."""
    for k, (sample, i) in enumerate(zip(samples, origins, strict=True)):
        sample.record, sample.last_turn = i, k + 1 == len(origins) or origins[k + 1] != i


def prompts_scored(a: EvalArgs) -> bool:
    """--train-on-prompt as given, else (run_eval filled it in: of_run.with_run_defaults) the data.train_on_prompt of
    the run --checkpoint is in, else off: the loss scores the tokens that run's val_loss scores."""
    if a.train_on_prompt:
        log.info("eval: the loss scores prompts and responses (train_on_prompt), as the val_loss of a run trained on "
                 "the prompts too (--train-on-prompt off: the responses only)")  # fmt: skip
    return bool(a.train_on_prompt)


def _scored(sample: Sample) -> bool:
    """Whether a sample has a token the loss is computed on (after the causal shift)."""
    return sample.trained(1) > 0


def run_eval(a: EvalArgs) -> int:
    from fasttune.eval import of_run

    run = of_run.run_of(a.checkpoint)
    cfg = of_run.run_config(run, needed=a.data is None)
    if a.data is None and cfg is None:
        raise ConfigError(f"`fasttune eval` needs --data (see `fasttune eval --help`): --checkpoint {a.checkpoint} is "
                          "not a fasttune run folder, whose own validation split eval scores without it")  # fmt: skip
    a, said = of_run.with_run_defaults(a, run, cfg)
    files = output_files(a, a.data if cfg is None or a.data is not None else cfg.data.path)
    from fasttune.generate.commands import load_checkpoint
    from fasttune.model.resolve import resolve

    src = resolve(a.checkpoint, option="--checkpoint")  # once: a run still training may add a checkpoint meanwhile
    read = None
    if a.data is None:
        model, tok, summary, samples, left_out = _run_split(a, src, run, cfg, said)
    else:
        read = _read(a)  # before the model loads
        if said:
            log.info(said)
        model, tok = load_checkpoint(a, src)
        summary, samples, left_out = _loss(a, src, model, tok, read)
    rows = _answers(a, model, tok, samples, summary, left_out) if a.generate else []
    if read is not None:
        rows = _with_files(rows, read[2])
    report(files, rows, summary, a.overwrite)
    return 0


def _with_files(rows: list[dict], places: list) -> list[dict]:
    """completions.jsonl's rows with the file each record came from and its index among that file's records (a
    folder's: the file in it), beside `index`, its position in --data's records joined."""
    from fasttune.data.formats import record_places

    at, named = record_places(places), []
    for row in rows:
        place, j = at(row["index"])
        named.append({"index": row["index"], "file": str(place.file), "file_index": j, **row})
    return named


def _run_split(a: EvalArgs, src, run: Path, cfg, said: str | None) -> tuple:
    """No --data: (model, tokenizer, the summary with the loss, the samples --generate answers, what it leaves out)
    of the run's own validation split, rebuilt as training built it (before the model loads, with the checkpoint's
    tokenizer); `said`: the line of the run's settings eval took, logged with the split. --generate answers the
    samples that were not cut to data.max_length."""
    from fasttune.eval import of_run
    from fasttune.generate.commands import load_checkpoint

    if a.generate and a.train_on_prompt:
        raise ConfigError(f"--generate without --data: the run {run} trained on its prompts (data.train_on_prompt), so "
                          "its validation samples have no prompt apart from the answer; pass --data with the "
                          "held-out records")  # fmt: skip
    held = {}

    def check(t, config) -> None:  # before the model loads
        _check_max_length(a, context_length(config))
        held.update(split=of_run.validation_split(a, run, cfg, src, t))

    model, tok = load_checkpoint(a, src, check=check)
    samples, used, fmt, what, layout = held["split"]
    if said:
        log.info(said)
    log.info("eval: the run's validation split: %s", what)
    scored = (samples if a.whole_split else of_run.validated(samples, used, model, layout))[: a.limit]
    d = used.data
    summary = {"checkpoint": a.checkpoint, "model": src.describe(), "data": f"the validation split of the run {run}",
               "format": fmt, "train_on_prompt": d.train_on_prompt and fmt != "text",
               "max_length": d.max_length, "overlong": d.overlong, "samples": len(scored)}  # fmt: skip
    summary.update(response_loss(model, scored, tok.pad_token_id, a.batch_size))
    answered, cut = whole_samples(samples[: a.limit])
    if a.generate and cut:
        log.info("eval: --generate leaves out %d of %d validation samples: cut at data.max_length %d (data.overlong "
                 "%s), so their answers are cut too", cut, cut + len(answered), d.max_length, d.overlong)  # fmt: skip
    return model, tok, summary, answered, {"generate_skipped_longer_than_context": 0,
                                           "generate_skipped_cut_at_max_length": cut}  # fmt: skip


def _loss(a: EvalArgs, src, model, tok, read: Read) -> tuple[dict, list[Sample], dict]:
    """(the summary with the loss, the whole samples --generate answers, what it leaves out: those too long for the
    context), of the records `read`."""
    context = context_length(model.config)
    prompts = prompts_scored(a)
    scored, samples, fmt, (loss_out, answers_out), cut = _samples(a, tok, context, prompts, read)
    if bool(a.max_length) and fmt != "text":  # supervised samples cut to --max-length for the loss: none too long
        loss_out = 0
    _say_left_out(context, loss_out, answers_out if a.generate else None)
    # cut's overlong (the policy a sample longer than the length met) takes the place of None where one applied
    summary = {"checkpoint": a.checkpoint, "model": src.describe(), "data": shown(a.data), "format": fmt,
               "train_on_prompt": prompts and fmt != "text", "max_length": a.max_length, "overlong": None,
               "samples": len(scored), "skipped_longer_than_context": loss_out, **cut}  # fmt: skip
    summary.update(response_loss(model, scored, tok.pad_token_id, a.batch_size))
    return summary, samples, {"generate_skipped_longer_than_context": answers_out}


def _answers(a: EvalArgs, model, tok, samples: list[Sample], summary: dict, left_out: dict) -> list[dict]:
    """--generate: the completions.jsonl rows; their scores, the counts of samples left out (`left_out`, by why),
    and the settings that reproduce them, go to `summary`."""
    from fasttune.generate.generate import fast_engine
    from fasttune.generate.sampling import sampling_top_k

    examples, unanswered = _examples(samples, tok)
    if not examples and left_out.get("generate_skipped_cut_at_max_length") and summary["format"] != "text":
        raise DataError(f"{summary['data']}: every sample was cut at data.max_length {summary['max_length']}, so no "
                        "answer is whole to score; pass --data with the held-out records (--generate answers them "
                        "whole)")  # fmt: skip
    if not examples:
        raise DataError(f"{summary['data']}: no sample has a prompt to answer ({summary['format']} data); "
                        "--generate needs supervised data (alpaca, prompt_completion or chat)")  # fmt: skip
    stop = a.stop or (default_stop(examples, tok) if a.default_stop else ())
    if stop and not a.stop:
        log.info("eval: Alpaca prompts: answers end before a next %r (--stop replaces it, --no-default-stop turns "
                 "it off)", ALPACA_STOP)  # fmt: skip
    rows, scores = generate_answers(model, tok, examples, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                                    temperature=a.temperature, top_p=a.top_p, seed=a.seed, stop=stop,
                                    engine=fast_engine(model))  # fmt: skip
    _say_unanswered(unanswered, len(examples) + sum(unanswered.values()), summary["format"])
    summary.update(scores, **left_out, **unanswered)  # and what reproduces them
    summary.update(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                   top_k=sampling_top_k(model) if a.temperature > 0 else None, seed=a.seed,
                   stop=list(stop))  # fmt: skip
    return rows


def _examples(samples: list[Sample], tok) -> tuple[list[Example], dict]:
    """What --generate answers: the prompt and reference of each sample ending with its record's last answer; and
    summary.json's counts of those it leaves out, having nothing to answer (an empty or blank prompt) or to score (no
    trained token: an empty response)."""
    examples, empty, untrained = [], 0, 0
    for s in samples:
        if not s.last_turn:
            continue
        if (ex := split_sample(s, tok)) is not None:
            examples.append(ex)
        elif len(s.spans):
            empty += 1
        else:
            untrained += 1
    return examples, {"generate_skipped_empty_prompt": empty, "generate_skipped_no_response": untrained}


def _say_unanswered(unanswered: dict, of: int, fmt: str) -> None:
    """One line for each kind of sample _examples left out (`of`: the samples with an answer to give)."""
    alpaca = " (or an Alpaca record's instruction and input are)" if fmt == "alpaca" else ""
    for key, why in (("generate_skipped_empty_prompt", "their prompt is empty, so there is nothing to answer"),
                     ("generate_skipped_no_response", f"their response is empty{alpaca}, so there is nothing to "
                                                      "score")):  # fmt: skip
        if n := unanswered[key]:
            log.warning("eval: --generate leaves out %d of %d %s: %s", n, of, "sample" if of == 1 else "samples", why)


def _say_left_out(context: int | None, loss: int, answers: int | None) -> None:
    """Warn of the samples left out as longer than the context: one line when the loss and --generate (`answers`;
    None: not asked for) left out as many, else a line for each side that left some out."""
    sides = {"": loss} if answers is None or answers == loss else {" of the loss": loss, " of --generate": answers}
    for where, n in sides.items():
        if n:
            log.warning("%d %s longer than the model's context (%s tokens) %s left out%s", n,
                        "sample" if n == 1 else "samples", context, "is" if n == 1 else "are", where)  # fmt: skip


def default_stop(examples: list[Example], tokenizer) -> tuple[str, ...]:
    """The stop strings of `eval --generate` without --stop: Alpaca prompts (the model learned `### Instruction:`
    opens the next exchange) stop at the next `### Instruction:`, which no answer of the data holds, as
    lm-evaluation-harness stops at its few-shot separator; other formats end at EOS and the end-of-turn token only."""
    if not examples or ALPACA_STOP not in tokenizer.decode(examples[0].prompt_ids):
        return ()
    return () if any(ALPACA_STOP in ex.reference for ex in examples) else (ALPACA_STOP,)


def whole_samples(samples: Sequence[Sample]) -> tuple[list[Sample], int]:
    """(the samples not cut to data.max_length, how many were): a cut one's answer is cut too, and scored against
    it as the reference it would make exact and numeric match wrong."""
    whole = [s for s in samples if s.whole]
    return whole, len(samples) - len(whole)
