"""From config to tokenized train/validation samples, the tokenizer and a data summary."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fasttune.config import BaseConfig, DataConfig
from fasttune.config.base_config import shown
from fasttune.data.corpus import corpus_fingerprint, holdout, holdout_tail, load_stdlib_corpus, too_few_to_hold_out
from fasttune.data.packing import Batcher
from fasttune.data.sample import Sample, Samples
from fasttune.data.tokenizer import cached_tokenizer, pad_with_eos, without_length_warning
from fasttune.errors import ConfigError, DataError, one_line
from fasttune.words import count

log = logging.getLogger("fasttune")


@dataclass
class DataSummary:
    source: str
    format: str
    train_samples: int = 0
    val_samples: int = 0
    train_tokens: int = 0
    longest: int = 0
    truncated: int = 0
    """Overlong samples cut to max_length and kept (one whose prompt alone fills it is in `no_response` only)."""
    truncated_tokens: int = 0
    """Tokens cut off the truncated samples."""
    truncated_trained: int = 0
    """Of those, the trained ones (response tokens a supervised sample lost)."""
    split: int = 0
    dropped: int = 0
    no_response: int = 0
    """Overlong samples left out because a cut would leave no trained token (the prompt alone fills max_length):
    counted here only, not as `truncated`, so that the train samples and those left out add up to the samples read."""
    untrained: int = 0
    """Samples left out because they have no trained token at all (e.g. an empty response)."""
    val_left_out: int = 0
    """Held-out samples left out by the same rules (dropped as too long, or no trained token left): not validated."""
    held: DataSummary | None = None
    """The validation split's counts by the same rules (build_data): its overlong samples get a line of their own."""
    padded_tokens: int = 0
    """Tokens the same samples would occupy as padded micro-batches (padding included)."""
    target_tokens: int = 0
    """Train tokens the loss is computed on (labels not ignored, after the causal shift)."""
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    """sha1 of every train and validation sample's tokens and labels: what a run trained on (checked on resume)."""
    val_fingerprint: str = ""
    """The same of the validation samples alone: eval of a run whose input files are unchanged (`inputs`) rebuilds
    them alone and checks them against it (build_validation)."""
    inputs: str = ""
    """sha1 of the input files' bytes (input_digest), taken before they are read; "" where not taken (build_data's
    `digest` off: under torchrun the ranks that write no checkpoint)."""

    def lines(self) -> list[str]:
        saved = self.padded_tokens - self.train_tokens
        pct = 100 * saved / self.padded_tokens if self.padded_tokens else 0.0
        # padded tokens not counted (benchmarks' synthetic data): no "packing saves -140,624 of 0"
        packing = [f"  packing saves {saved:,} of {self.padded_tokens:,} padded tokens ({pct:.1f}%)"]
        out = [
            f"data: {self.source} ({self.format})",
            f"  samples: {self.train_samples:,} train, {self.val_samples:,} validation; "
            f"{self.train_tokens:,} train tokens, longest {self.longest:,}",
            *(packing if self.padded_tokens else []),
        ]
        held = self.held is not None and self.held.truncated + self.held.split + self.held.dropped
        out.append(self._overlong("training samples" if held else "samples", "trained"))  # alone: every one
        if held:
            out.append(self.held._overlong("validation samples", "scored"))
        if self.no_response:
            out.append(f"  left out: {count(self.no_response, 'overlong sample')} whose prompt alone filled max_length "
                       "(no response token left to train)")  # fmt: skip
        if self.untrained:
            alpaca = ", or no instruction or input" if self.format == "alpaca" else ""
            why = ("a split text's last piece of one token, or an empty text" if self.format == "text" else
                   f"e.g. an empty response{alpaca}")  # fmt: skip
            out.append(f"  left out: {count(self.untrained, 'sample')} with no trained token ({why})")
        return out + self._val_left_out() + self.notes

    def _val_left_out(self) -> list[str]:
        """The held-out samples left out that no other line counts: the overlong validation line has those dropped
        (it said them, and this line counted them again); without the split's counts (`held`), all of them."""
        if self.held is None:
            n, why = self.val_left_out, "too long to keep, or no trained token left"
        else:
            h = self.held
            n = h.no_response + h.untrained
            why = ", or ".join(w for w, k in (("the prompt alone filled max_length", h.no_response),
                                              ("no trained token left", h.untrained)) if k)  # fmt: skip
        if not n:
            return []
        return [f"  left out of validation: {count(n, 'held-out sample')}, by the same rules ({why})"]

    def _overlong(self, what: str, labelled: str) -> str:
        """'  overlong samples: 2 truncated (1,234 tokens cut, 1,000 of them trained), 0 split, 0 dropped', the cut
        tokens said where a sample was truncated; `labelled`: what a cut token with a label would have been."""
        cut = f" ({self.truncated_tokens:,} tokens cut, {self.truncated_trained:,} of them {labelled})"
        return f"  overlong {what}: {self.truncated} truncated{cut if self.truncated else ''}, {self.split} split, " \
               f"{self.dropped} dropped"  # fmt: skip


@dataclass
class DataBundle:
    train: Sequence[Sample]
    """build_data's are `Samples` (one flat array, no object per sample held); a list does as well (benchmarks)."""
    val: Sequence[Sample]
    tokenizer: PreTrainedTokenizerBase
    summary: DataSummary


def fit_length(samples: list[Sample], max_length: int, mode: str, summary: DataSummary) -> list[Sample]:
    """Apply the overlong policy (truncate / split / drop) and count what happened. Samples left with no trained
    token are left out and counted apart, each sample once: overlong ones whose prompt alone fills max_length
    (`no_response`, not `truncated`) and ones that had none to begin with (`untrained`)."""
    out = []
    for s in samples:
        n = len(s)
        if n <= max_length:
            out.append(s)
        elif mode == "truncate":
            cut = s.cut(0, max_length)
            if cut.trained(1):
                summary.truncated += 1
                summary.truncated_tokens += n - max_length
                summary.truncated_trained += s.trained(max_length)
                out.append(cut)
            else:
                summary.no_response += 1
        elif mode == "split":
            summary.split += 1
            out.extend(s.cut(i, i + max_length) for i in range(0, n, max_length))
        else:
            summary.dropped += 1
    kept = [s for s in out if s.trained(1)]  # a target after the causal shift
    summary.untrained += len(out) - len(kept)
    return kept


def no_samples_left(source: str, summary: DataSummary, held: DataSummary | None = None, max_length: int = 0) -> str:
    """Why no training sample is left, as one line with the fix for its cause; `held`: the validation split's counts
    (its samples are left out by the same rules, and the user counts records, not splits)."""
    dropped, no_response, untrained = (getattr(summary, k) + (getattr(held, k) if held else 0)
                                       for k in ("dropped", "no_response", "untrained"))  # fmt: skip
    if summary.format == "text" and 0 < max_length < 2:
        return (f"{source}: no training samples left (data.max_length {max_length} leaves samples of one token, "
                "with no next token to predict); raise --data.max-length to 2 or more")  # fmt: skip
    causes = []
    if dropped:
        causes.append((f"{dropped} dropped as longer than data.max_length (data.overlong=drop)",
                       "raise --data.max-length or pass --data.overlong truncate"))  # fmt: skip
    if no_response:
        causes.append((f"{no_response} truncated to data.max_length with no response token left (the prompt alone "
                       "fills it)", "raise --data.max-length or shorten the prompts"))  # fmt: skip
    if untrained and summary.format == "text":
        causes.append((f"{untrained} with no text", "add text to the records"))
    elif untrained:
        causes.append((f"{untrained} with an empty response, so nothing to train on", "fill in the responses (or "
                       "pass --data.train-on-prompt to train on the prompts too)"))  # fmt: skip
    why = "; ".join(c for c, _ in causes) or "the data set is empty"
    fix = "; ".join(dict.fromkeys(f for _, f in causes)) or "add records"
    return f"{source}: no training samples left ({why}); {fix}"


def _text_samples(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[Sample]:
    """The embedded corpus's files, each + EOS, every token trained; tokenized 256 files per call."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    without_length_warning(tokenizer)
    out = []
    for lo in range(0, len(texts), 256):
        ids = tokenizer(texts[lo : lo + 256], add_special_tokens=False)["input_ids"]
        out += [Sample(x + eos, [(0, len(x) + len(eos))]) for x in ids]
    return out


def _hold_out_pieces(docs: list[Sample], val_fraction: float, piece: int, summary: DataSummary) -> tuple[list, list]:
    """Text with too few documents to hold whole ones out: its last pieces are, and the summary says which."""
    train, val, held, pieces = holdout_tail(docs, val_fraction, piece)
    what = f"{len(docs)} document{'s' if len(docs) != 1 else ''}"
    if held:
        tokens = sum(map(len, val))
        summary.notes.append(f"  validation: the last {held} of {pieces} pieces of {piece} tokens ({tokens:,} tokens "
                             f"at the end of the text; {what}, too few to hold whole ones out at data.val_fraction "
                             f"{val_fraction})")  # fmt: skip
    return train, val


def _record_text(record: dict) -> str:
    """The raw text of a record, for training a tokenizer (chat messages contribute their contents)."""
    if isinstance(record.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    return "\n".join(str(v) for v in record.values() if isinstance(v, str))


def _records_corpus(records: list[dict]) -> tuple[list[str], str]:
    """The records' texts, to train a tokenizer on, and the key it is cached by: sha1 of the texts joined by NUL,
    hashed piece by piece (the joined text would be two more copies of the data set)."""
    texts = [_record_text(r) for r in records]
    h = hashlib.sha1()
    for i, text in enumerate(texts):
        h.update(b"\0" if i else b"")
        h.update(text.encode())
    return texts, h.hexdigest()[:16]


def _load_tokenizer(cfg: BaseConfig, corpus: Callable[[], tuple[list[str], str]]) -> PreTrainedTokenizerBase:
    """--model's tokenizer, else one trained on `corpus()` (texts, fingerprint): only then are the texts gathered and
    hashed, which for a data set of GBs takes its time and memory."""
    if cfg.model.path:
        from fasttune.model.resolve import TOKENIZER_FILES, has_tokenizer

        folder = Path(cfg.model.path)
        if folder.is_dir() and not has_tokenizer(folder):
            raise DataError(f"--model {folder}: no tokenizer files there ({', '.join(TOKENIZER_FILES)}); save the "
                            "model's tokenizer into that folder with tokenizer.save_pretrained")  # fmt: skip
        try:
            tok = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            why = one_line(e)  # transformers' messages run over several lines
            raise DataError(
                f"--model {cfg.model.path}: no usable tokenizer there ({why}); save one with "
                "tokenizer.save_pretrained into that folder"
            ) from None
        return pad_with_eos(tok)
    texts, fingerprint = corpus()
    return cached_tokenizer(texts, cfg.data.tokenizer_vocab_size, cfg.data.cache_dir, fingerprint)


def build_data(cfg: BaseConfig, tokenizer: PreTrainedTokenizerBase | None = None, digest: bool = True) -> DataBundle:
    """Tokenized train/validation samples; `tokenizer` (a run's checkpoint's: its resume, eval of its split) replaces
    the usual one, the records then taken as that run's data (a chat record its prompt format drops is said not to be
    the run's: tokenize_records' run_data). `digest`: take the input files' digest (summary.inputs: every file read
    once more), which only checkpoints record: under torchrun rank 0 alone writes them."""
    d = cfg.data
    inputs = input_digest(d) if digest else ""  # before the files are read: one edited meanwhile fails it, never passes
    read = _read_corpus if d.path is None else _read_records
    train, val, tokenizer, summary = read(cfg, tokenizer)
    summary.inputs = inputs
    overlong = overlong_policy(d.overlong, summary.format, d.max_length)
    train = fit_length(train, d.max_length, overlong, summary)
    held = DataSummary("", summary.format)
    val = fit_length(val, d.max_length, overlong, held)
    summary.val_left_out, summary.held = held.dropped + held.no_response + held.untrained, held
    if not train:  # a separate validation file's samples are not the training data's
        held_out = held if d.val_path is None else None
        source = shown(d.path) if d.path else "embedded corpus"
        raise DataError(no_samples_left(source, summary, held_out, d.max_length))
    _count(summary, train, val, cfg)
    return DataBundle(Samples(train), Samples(val), tokenizer, summary)


def build_validation(cfg: BaseConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[Samples, DataSummary] | None:
    """build_data's validation samples and a summary of them (format, source, val_fingerprint), the training records
    held out of the same records but never tokenized (`tokenizer`: the run's): what eval of a run scores, in a
    fraction of the time when the training set is large (eval/of_run.py). None where the split needs every sample
    tokenized: text of too few documents to hold whole ones out (its last pieces are held out)."""
    d = cfg.data
    read = (_read_corpus if d.path is None else _read_records)(cfg, tokenizer, val_only=True)
    if read is None:
        return None
    _, val, _, summary = read
    val = fit_length(val, d.max_length, overlong_policy(d.overlong, summary.format, d.max_length),
                     DataSummary("", summary.format))  # fmt: skip
    summary.val_samples, summary.val_fingerprint = len(val), data_fingerprint((), val)
    return Samples(val), summary


def input_digest(d: DataConfig) -> str:
    """sha1 of the bytes of every file the data is read from, each after its name (_input_files): equal digests,
    equal records. "" when one cannot be read (the reader says why, in its own words)."""
    h = hashlib.sha1()
    try:
        files = _input_files(d)
        for name, path in files or ():
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha1").digest())
    except OSError:
        return ""
    return h.hexdigest()[:16] if files is not None else ""


def _input_files(d: DataConfig) -> list[tuple[str, Path]] | None:
    """(name, path) of each file the data may be read from: --data's and --data.val-path's, resolved (a folder's files
    by their path in it, under data/ or val/, data[i]/ or val[i]/ for the i-th of several paths), or the embedded
    corpus's stdlib files; None where a path is neither a file nor a folder (empty, a FIFO, whose read would wait for
    a writer: the reader refuses it)."""
    from fasttune.data.folders import data_files

    if d.path is None:
        from fasttune.data.corpus import list_stdlib_files, stdlib_root

        root = stdlib_root()
        return [(name, root / name) for name in list_stdlib_files(root)[: d.max_documents]]
    files = []
    for tag, paths in (("data", d.path), ("val", d.val_path)):
        for i, given in enumerate(paths or ()):
            top = Path(given)
            if not given or not (top.is_file() or top.is_dir()):
                return None
            top = top.resolve()  # one name through a link or not: training digests the path typed, eval config.json's
            name = tag if len(paths) == 1 else f"{tag}[{i}]"  # one path: the names an older run's checkpoint digested
            files += [(f"{name}/{f.relative_to(top) if f != top else f.name}", f) for f in data_files(top)]
    return files


def check_paths(d: DataConfig) -> None:
    """--data and --data.val-path refused in the readers' one line when they cannot be read (formats.check_readable):
    training checks them first, before the run folder, the tokenizer or the model is touched, and before a large
    --data is read only for a missing validation file to stop the run."""
    from fasttune.data.formats import check_readable

    if d.path is None:
        _refuse_val_without_data(d)
        return
    for flag, paths in (("--data", d.path), ("--data.val-path", d.val_path or ())):
        for path in paths:
            check_readable(path, flag)
    _refuse_val_in_data(d)


def _refuse_val_in_data(d: DataConfig) -> None:
    """A --data.val-path file that is also read by --data (the same file, or one in its folder): val_loss would score
    records the run trains on, and look as good as the training loss; refused, naming the file."""
    from fasttune.data.folders import data_files

    trained = {f for path in d.path for f in data_files(_read_split(Path(path).resolve()))}
    for path in d.val_path or ():
        if shared := next((f for f in data_files(Path(path).resolve()) if f in trained), None):
            raise ConfigError(f"--data.val-path {shown(d.val_path)}: {shared} is also read by --data, so val_loss "
                              "would score records the run trains on; give validation records of their own, or drop "
                              "--data.val-path to hold out --data.val-fraction of --data")  # fmt: skip


def _read_split(path: Path) -> Path:
    """The folder --data reads at `path`: a save_to_disk DatasetDict's train split (its test split may validate)."""
    return path / "train" if (path / "dataset_dict.json").is_file() and (path / "train").is_dir() else path


def _refuse_val_without_data(d: DataConfig) -> None:
    if d.val_path is not None:
        raise ConfigError(f"--data.val-path {shown(d.val_path)}: a validation file is for the --data it validates, "
                          "and no --data is given (the embedded corpus); pass --data or drop "
                          "--data.val-path")  # fmt: skip


_Read = tuple[list[Sample], list[Sample], PreTrainedTokenizerBase, DataSummary]
"""(train samples, validation samples, tokenizer, summary) of a source, before the overlong policy."""


def _read_corpus(cfg: BaseConfig, tokenizer: PreTrainedTokenizerBase | None, val_only: bool = False) -> _Read:
    """No --data: the embedded corpus (the Python stdlib's files), every token trained; `val_only`: the training
    documents are not tokenized (build_validation)."""
    d = cfg.data
    if d.field is not None:  # checked here: a --config file may set it and the command line --data
        raise ConfigError(f"data.field={d.field!r} names a key of a --data .json file, and no --data is given "
                          "(the embedded corpus); pass --data FILE.json or drop --data.field")  # fmt: skip
    _refuse_val_without_data(d)
    train_docs, val_docs = load_stdlib_corpus(d.max_documents, d.val_fraction)
    tokenizer = tokenizer or _load_tokenizer(
        cfg, lambda: ([x.text for x in train_docs], corpus_fingerprint(train_docs))
    )
    summary = DataSummary(
        source=f"embedded corpus (Python stdlib, {len(train_docs) + len(val_docs)} files)", format="text"
    )
    train = [] if val_only else _text_samples([x.text for x in train_docs], tokenizer)
    val = _text_samples([x.text for x in val_docs], tokenizer)
    return train, val, tokenizer, summary


def _read_records(cfg: BaseConfig, tokenizer: PreTrainedTokenizerBase | None, val_only: bool = False) -> _Read | None:
    """--data's records, held out by record, else (text with too few documents) by the last pieces of the text;
    `val_only`: the training records are not tokenized (build_validation), None where the pieces need them."""
    from fasttune.data.formats import load_paths, record_names
    from fasttune.data.records import PROMPT_TURNS, say_unrendered
    from fasttune.data.sft import say_empty_prompts, tokenize_records

    d, source, places, run_data = cfg.data, shown(cfg.data.path), [], tokenizer is not None  # build_data's
    records, fmt = load_paths(d.path, d.format, field=d.field, places=places)
    named = record_names(places)
    records = records[: d.max_documents]
    say_unrendered(records, fmt, source)
    say_empty_prompts(records, fmt, source, named)
    by_piece = fmt == "text" and too_few_to_hold_out(len(records), d.val_fraction) and d.val_path is None
    if by_piece and val_only:
        return None
    fraction = 0.0 if by_piece else d.val_fraction
    summary = DataSummary(source=source, format=fmt)
    if d.val_path is None:  # held out by position: a record is named by its place in the data, not in its split
        train_at, val_at = holdout(list(range(len(records))), [str(i) for i in range(len(records))], fraction)
        train_recs, val_recs = [records[i] for i in train_at], [records[i] for i in val_at]
        train_names, val_names = _named_at(named, train_at), _named_at(named, val_at)
    else:
        train_recs, train_names = records, named
        val_recs, val_names = _val_records(d, fmt, summary)
    tokenizer = tokenizer or _load_tokenizer(cfg, lambda: _records_corpus(train_recs))
    if any(PROMPT_TURNS in r for r in records):
        summary.notes.append("  read as chat: TRL's conversational prompt/completion (messages = prompt + "
                             "completion; the completion's assistant turns are trained)")  # fmt: skip
    train = [] if val_only else tokenize_records(train_recs, fmt, tokenizer, train_on_prompt=d.train_on_prompt,
                                                 source=source, notes=summary.notes, names=train_names,
                                                 run_data=run_data)  # fmt: skip
    val = tokenize_records(val_recs, fmt, tokenizer, train_on_prompt=d.train_on_prompt,
                           source=shown(d.val_path or d.path), notes=[], names=val_names,
                           run_data=run_data)  # fmt: skip
    if by_piece:
        train, val = _hold_out_pieces(train, d.val_fraction, d.max_length, summary)
    return train, val, tokenizer, summary


def _named_at(named: Callable[[int], str], at: list[int]) -> Callable[[int], str]:
    """How errors name the i-th record of a split: as `named` names at[i], its index in the records read."""
    return lambda i: named(at[i])


def _val_records(d: DataConfig, fmt: str, summary: DataSummary) -> tuple[list[dict], Callable[[int], str]]:
    """--data.val-path's records, read as --data's (`fmt`, its format; --data.field names the key of the .json ones),
    and how errors name them (formats.record_names): the validation set; --data.max-documents applies to --data only,
    and a DatasetDict of several splits is refused (which one validates is the user's to say)."""
    from fasttune.data.formats import load_paths, record_names
    from fasttune.data.records import say_unrendered
    from fasttune.data.sft import say_empty_prompts

    val_path, places = shown(d.val_path), []
    json_file = any(Path(p).suffix.lower() == ".json" for p in d.val_path)  # a .jsonl one has no key to name
    records, val_fmt = load_paths(d.val_path, d.format, split=None, field=d.field if json_file else None,
                                  flag="--data.val-path", places=places)  # fmt: skip
    if val_fmt != fmt:
        raise DataError(f"--data.val-path {val_path}: its records are {val_fmt} but --data {shown(d.path)}'s are "
                        f"{fmt}; give a validation file of the training data's format")  # fmt: skip
    say_unrendered(records, fmt, val_path)
    say_empty_prompts(records, fmt, val_path, record_names(places))
    summary.notes.append(f"  validation: the {count(len(records), 'record')} of --data.val-path {val_path} (nothing "
                         "held out of --data; data.val_fraction is not used)")  # fmt: skip
    return records, record_names(places)


def overlong_policy(overlong: str, fmt: str, max_length: int) -> str:
    """data.overlong as applied to data of format `fmt`: auto splits text and truncates supervised samples."""
    if overlong == "auto":
        return "split" if fmt == "text" else "truncate"
    if overlong == "split" and fmt != "text":
        # A split would train answers cut off from their prompts: truncate supervised samples instead.
        log.warning(
            "data.overlong=split applies to plain text only; truncating %s samples longer than %d tokens",
            fmt,
            max_length,
        )
        return "truncate"
    return overlong


def _count(summary: DataSummary, train: list[Sample], val: list[Sample], cfg: BaseConfig) -> None:
    """The summary's counts of the samples kept: sizes, trained tokens, padding packing saves, the fingerprint."""
    lengths = [len(s) for s in train]
    summary.train_samples, summary.val_samples = len(train), len(val)
    summary.train_tokens, summary.longest = sum(lengths), max(lengths)
    summary.target_tokens = sum(s.trained(1) for s in train)  # as the loss counts them
    if summary.format != "text":  # supervised: say where the loss is (the response-only mask is otherwise invisible)
        scope = "prompts and responses" if cfg.data.train_on_prompt else "responses only"
        pct = 100 * summary.target_tokens / summary.train_tokens
        summary.notes.append(
            f"  loss on {scope}: {summary.target_tokens:,} of {summary.train_tokens:,} tokens ({pct:.1f}%)"
        )
    padded = Batcher.from_config(cfg.data, cfg.seed, packing=False).plan(lengths, epoch=0)
    summary.padded_tokens = sum(len(b) * max(lengths[i] for i in b) for b in padded)
    summary.fingerprint, summary.val_fingerprint = data_fingerprint(train, val), data_fingerprint((), val)


def data_fingerprint(train: Sequence[Sample], val: Sequence[Sample]) -> str:
    """sha1 over the samples' token ids and labels, in order, train then validation, each as native int64 (the bytes
    of array("q", ids) and array("q", labels) of the lists samples once were: an older run's fingerprint still
    matches); ~3 s per 100M tokens on one CPU core, small beside tokenizing them."""
    h = hashlib.sha1()
    for part in (train, val):
        h.update(len(part).to_bytes(8, "little"))
        for s in part:
            h.update(s.ids.astype(np.int64).tobytes())
            h.update(s.labels().tobytes())
    return h.hexdigest()[:16]
