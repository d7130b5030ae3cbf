"""Compact samples (data/sample.py): a data set held as int32 ids and trained spans (`Samples`: two flat arrays and
their offsets) takes a fraction of the host memory of HF-style lists, and gives the batches, labels and data
fingerprint those lists gave."""

import copy
import hashlib
import tracemalloc
from array import array

import numpy as np
import pytest
import torch
from helpers import sft_config
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttune.data.corpus import holdout
from fasttune.data.formats import load_paths
from fasttune.data.packing import IGNORE, Batcher, collate_packed
from fasttune.data.pipeline import build_data, data_fingerprint
from fasttune.data.sample import Sample, Samples
from fasttune.data.sft import format_prompt


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """(tokenizer, config, the data fasttune builds) for the GSM8K fixture with a tokenizer that adds BOS."""
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=None, bos="<s>")
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    cfg = sft_config(tmp_path_factory.mktemp("run"), folder, max_length=1024, micro_batch_size=2)
    return tok, cfg, build_data(cfg)


def _hf_sample(tok, record: dict) -> dict:
    """The sample as lists, from plain tokenizer calls: BOS, the prompt and response (the prompt tokenized apart when
    its last token would run into the response), EOS; labels the response and EOS."""
    prompt = format_prompt(record, "alpaca")
    enc = tok(prompt + record["output"], add_special_tokens=False, return_offsets_mapping=True)
    if any(start < len(prompt) < end for start, end in enc["offset_mapping"]):
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        tail = tok(record["output"], add_special_tokens=False)["input_ids"]
        ids, labels = head + tail, [IGNORE] * len(head) + tail
    else:
        ids, starts = enc["input_ids"], [start for start, _ in enc["offset_mapping"]]
        labels = [t if start >= len(prompt) else IGNORE for t, start in zip(ids, starts, strict=True)]
    return {"input_ids": [tok.bos_token_id, *ids, tok.eos_token_id],
            "labels": [IGNORE, *labels, tok.eos_token_id]}  # fmt: skip


def _reference(tok, cfg) -> tuple[list[dict], list[dict]]:
    records, _ = load_paths(cfg.data.path, "auto")
    train, val = holdout(records, [str(i) for i in range(len(records))], cfg.data.val_fraction)
    return [_hf_sample(tok, r) for r in train], [_hf_sample(tok, r) for r in val]


def _list_collate(samples: list[dict], packing: bool) -> dict:
    """The batches of lists, built as fasttune built them from lists (torch.tensor of the joined lists)."""
    if not packing:
        width = max(len(s["input_ids"]) for s in samples)
        rows = [(s["input_ids"], s["labels"], len(s["input_ids"])) for s in samples]
        return {"input_ids": torch.tensor([ids + [0] * (width - n) for ids, _, n in rows]),
                "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for _, _, n in rows]),
                "labels": torch.tensor([lab + [IGNORE] * (width - n) for _, lab, n in rows])}  # fmt: skip
    ids, labels, pos, cu = [], [], [], [0]
    for s in samples:
        ids += s["input_ids"]
        labels += [IGNORE, *s["labels"][1:]]
        pos += range(len(s["input_ids"]))
        cu.append(cu[-1] + len(s["input_ids"]))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    longest = int((cu_t[1:] - cu_t[:-1]).max())
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos]),
            "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}  # fmt: skip


def test_samples_batches_and_fingerprint_are_those_of_hf_lists(gsm8k):
    tok, cfg, data = gsm8k
    train, val = _reference(tok, cfg)
    assert [s["input_ids"] for s in data.train] == [s["input_ids"] for s in train]
    assert [s["labels"] for s in data.train + data.val] == [s["labels"] for s in train + val]
    lengths = [len(s["input_ids"]) for s in train]
    for packing in (True, False):
        batcher = Batcher.from_config(cfg.data, seed=3, packing=packing, pad_id=0)
        for batch in batcher.plan(lengths, epoch=1):
            got = batcher.collate([data.train[i] for i in batch])
            want = _list_collate([train[i] for i in batch], packing)
            assert got.keys() == want.keys()
            for key, value in want.items():
                same = torch.equal(got[key], value) and got[key].dtype == value.dtype if torch.is_tensor(value) else (
                    got[key] == value)  # fmt: skip
                assert same, (packing, key)
    # the fingerprint of a run started on lists: --resume still matches
    h = hashlib.sha1()
    for part in (train, val):
        h.update(len(part).to_bytes(8, "little"))
        for s in part:
            h.update(array("q", s["input_ids"]).tobytes() + array("q", s["labels"]).tobytes())
    assert data.summary.fingerprint == data_fingerprint(data.train, data.val) == h.hexdigest()[:16]
    assert data.summary.target_tokens == sum(sum(t != IGNORE for t in s["labels"][1:]) for s in train)


def _held_bytes(samples: list) -> int:
    """Bytes a copy of `samples` allocates (each token id an int shared with the original: the lists' pointers and
    the arrays' data count, the int objects do not)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = copy.deepcopy(samples)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        del kept


def test_samples_take_four_bytes_per_token_and_a_few_hundred_per_sample(gsm8k):
    tok, cfg, data = gsm8k
    samples = data.train + data.val
    tokens = sum(map(len, samples))
    arrays = sum(s.ids.nbytes + s.spans.nbytes for s in samples)
    assert arrays < 4.2 * tokens  # int32 ids and a few spans
    bound = arrays + 512 * len(samples)  # each sample's object and its two arrays' headers
    assert _held_bytes(samples) <= bound
    assert _held_bytes([s for part in _reference(tok, cfg) for s in part]) > 3 * bound  # what lists held


@settings(max_examples=80, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 2**31 - 1), st.booleans()), min_size=1, max_size=60), st.data())
def test_a_sample_gives_the_labels_cuts_and_counts_of_its_lists(tokens, draw):
    ids = [t for t, _ in tokens]
    labels = [t if trained else IGNORE for t, trained in tokens]  # several trained runs, as a multi-turn chat has
    sample = Sample.from_labels(ids, labels)
    assert sample["input_ids"] == ids and sample["labels"] == labels and len(sample) == len(ids)
    lo, hi = sorted(draw.draw(st.tuples(st.integers(0, len(ids)), st.integers(0, len(ids)))))
    assert sample.cut(lo, hi)["labels"] == labels[lo:hi] and sample.cut(lo, hi)["input_ids"] == ids[lo:hi]
    assert sample.trained(lo, hi) == sum(t != IGNORE for t in labels[lo:hi])
    assert sample.trained(1) == sum(t != IGNORE for t in labels[1:])
    for key, value in collate_packed([sample, sample]).items():
        want = collate_packed([{"input_ids": ids, "labels": labels}] * 2)[key]
        assert torch.equal(value, want) if torch.is_tensor(want) else value == want


def test_a_label_other_than_its_token_or_an_id_beyond_int32_is_refused():
    with pytest.raises(ValueError, match="neither -100 nor its own token"):
        Sample.from_labels([5, 6], [IGNORE, 7])
    with pytest.raises((ValueError, OverflowError)):
        Sample([2**31])


def test_a_data_set_holds_its_samples_in_two_flat_arrays_not_an_object_each(gsm8k):
    """build_data's samples are a `Samples`: ~20 bytes a sample beside their tokens, where a list of `Sample`s held
    ~300 more (the object and its two arrays' headers: 0.3 GB per million samples and rank); each sample reads as
    the `Sample` it was made from."""
    _, _, data = gsm8k
    assert isinstance(data.train, Samples) and isinstance(data.val, Samples)
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(0, 50_000, n), [(n // 2, n)]) for n in rng.integers(8, 64, 4000)]
    samples[7] = Sample([5, 6, 7])  # no trained token: no spans
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flat = Samples(samples)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    arrays = sum(s.ids.nbytes + s.spans.nbytes for s in samples)
    assert held <= arrays + 24 * len(samples) + 4096
    assert _held_bytes(samples) > held + 250 * len(samples)  # what a list of samples holds
    assert len(flat) == len(samples) and flat == samples and list(flat) == samples
    assert flat[-1] == samples[-1] and flat[3:9:2] == samples[3:9:2] and flat + flat[:2] == samples + samples[:2]
    with pytest.raises(IndexError):
        flat[len(samples)]
    with pytest.raises(ValueError, match="read-only"):
        flat[0].ids[0] = 1  # a view into the data set: a batch's code that wrote into it would change the data
    numbered = [Sample([1, 2], [(1, 2)], record=3, last_turn=False), Sample([4], [(0, 1)], record=3)]
    assert list(Samples(numbered)) == numbered and list(Samples([])) == []


@pytest.mark.parametrize("overlong", ["truncate", "split", "drop"])
def test_a_sample_cut_to_max_length_is_marked_and_one_exactly_that_long_is_not(overlong):
    """What --generate leaves out (eval/run.py whole_samples) is what data.overlong cut, not what a length suggests:
    a sample exactly max_length tokens long is whole, and every piece of a longer one (a split's last, shorter piece
    too) is not; the mark survives the data set's flat arrays (`Samples`, where build_data puts it)."""
    from fasttune.data.pipeline import DataSummary, fit_length

    exact, longer, short = Sample(range(8), [(3, 8)]), Sample(range(10, 21), [(2, 11)]), Sample([1, 2, 3], [(1, 3)])
    kept = Samples(fit_length([exact, longer, short], 8, overlong, DataSummary("", "alpaca")))
    pieces = {"truncate": [longer.ids[:8]], "split": [longer.ids[:8], longer.ids[8:]], "drop": []}[overlong]
    assert [s.ids.tolist() for s in kept] == [exact.ids.tolist(), *(p.tolist() for p in pieces), short.ids.tolist()]
    assert [s.whole for s in kept] == [True, *(False for _ in pieces), True]
    assert kept[0] == exact and Samples([exact, short])._whole is None  # nothing cut: no byte per sample held
