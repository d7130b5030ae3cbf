"""--data (and --data.val-path, eval's --data, bench's --data) takes several paths: one data set of their records in
the order given, each file's format detected and checked on its own, one format trained; from the command line, a
--config file's list, the run's config.json (an older run's one path as a string too), on --resume and in eval."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from fasttune import cli
from fasttune.config import DataConfig, from_dict, get_experiment, to_dict
from fasttune.data.formats import load_paths, load_records
from fasttune.data.pipeline import build_data, input_digest
from fasttune.errors import ConfigError, DataError

ALPACA = [
    {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."} for i in range(24)
]


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _parquet(path: Path, records: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def test_several_paths_are_read_in_order_each_in_its_own_format(tmp_path):
    """Each file's format is detected on its own (ShareGPT turns beside role/content messages beside TRL's
    conversational prompt/completion: all chat) and the records are those of each file read alone, in the order
    given; files that train as different formats are refused naming both, and so is a file named twice."""
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    chat = [
        _jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": turns}]),
        _jsonl(
            tmp_path / "messages.jsonl",
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
        ),  # fmt: skip
        _jsonl(
            tmp_path / "trl.jsonl",
            [{"prompt": [{"role": "user", "content": "c"}], "completion": [{"role": "assistant", "content": "d"}]}],
        ),  # fmt: skip
    ]
    for paths in (chat, chat[::-1]):
        alone = [r for p in paths for r in load_records(p)[0]]
        assert load_paths(paths) == (alone, "chat") and len(alone) == 3
    a = _jsonl(tmp_path / "a.jsonl", ALPACA[:3])
    b = _parquet(tmp_path / "b.parquet", ALPACA[3:5])
    assert load_paths([b, a]) == (ALPACA[3:5] + ALPACA[:3], "alpaca")
    with pytest.raises(DataError) as info:
        load_paths([a, b, chat[0]])
    assert str(info.value) == (f"{chat[0]}: its records are chat, and those of {a} (given with it as --data) are "
                               "alpaca; one run trains one format: convert the files to one (chat also reads ShareGPT "
                               "and TRL's conversational records) or train on them apart")  # fmt: skip
    with pytest.raises(DataError, match=f"^{a}: its records are alpaca, .* of {chat[0]} .* are chat"):
        load_paths([chat[0], a], "auto")
    for paths, twice in (([a, b, a], "twice"), ([str(tmp_path / "."), a], f"by {tmp_path / '.'} and by {a}")):
        with pytest.raises(DataError) as info:
            load_paths(paths)
        assert str(info.value) == (f"--data: {tmp_path / 'a.jsonl'} is named {twice}, so its records would be read "
                                   "twice; give each file once")  # fmt: skip


def test_a_folder_reads_each_file_in_its_own_format_as_several_paths_do(tmp_path):
    """The files of a --data folder train as they do named one after the other: role/content messages beside TRL's
    conversational prompt/completion were refused (the first file's kind held for all), and a folder of Alpaca and
    chat files was 'missing field messages ... pass the right --data.format', which no format fixes: it names both."""
    messages = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    trl = {"prompt": [{"role": "user", "content": "c"}], "completion": [{"role": "assistant", "content": "d"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "e"}, {"from": "gpt", "value": "f"}]}
    for name, records in (("m", [messages, trl, sharegpt]), ("t", [trl, messages])):
        (folder := tmp_path / name).mkdir()
        files = [_jsonl(folder / f"{i}.jsonl", [r]) for i, r in enumerate(records)]
        assert load_records(str(folder)) == load_paths(files)
        assert load_records(str(folder))[1] == "chat" and len(load_records(str(folder))[0]) == len(records)
    (mixed := tmp_path / "mixed").mkdir()
    a, b = _jsonl(mixed / "a.jsonl", ALPACA[:2]), _jsonl(mixed / "b.jsonl", [messages])
    with pytest.raises(DataError) as info:
        load_records(str(mixed))
    assert str(info.value) == (f"{b}: its records are chat, and those of {a} (in the folder {mixed}) are alpaca; one "
                               "run trains one format: convert the files to one (chat also reads ShareGPT and TRL's "
                               "conversational records) or train on them apart")  # fmt: skip
    with pytest.raises(DataError, match=rf"^{b} line 1: missing field 'instruction' for format alpaca"):
        load_records(str(mixed), "alpaca")  # a format named checks every file's records by it


def test_a_json_key_given_for_several_paths_is_read_from_their_json_files(tmp_path):
    """--data.field names the key of a .json file's object: beside a .jsonl file it is that .json file's, while a
    lone .jsonl file given it is still refused (the option would do nothing)."""
    (keyed := tmp_path / "k.json").write_text(json.dumps({"version": 2, "rows": ALPACA[:2], "more": ALPACA[2:4]}))
    lines = _jsonl(tmp_path / "l.jsonl", ALPACA[4:5])
    assert load_paths([str(keyed), lines], field="more") == (ALPACA[2:5], "alpaca")
    with pytest.raises(DataError, match="--data.field more names a key of a .json file's top-level object, and this "
                                        "is a .jsonl file; drop --data.field"):  # fmt: skip
        load_paths([lines], field="more")
    other = _jsonl(tmp_path / "m.jsonl", ALPACA[5:6])
    with pytest.raises(DataError) as info:  # several paths, none with a key to name: the option does nothing
        load_paths([lines, other], field="more", option="--format")
    assert str(info.value) == ("--field more names a key of a .json file's top-level object, and none of the paths of "
                               "--data is a .json file or a folder; drop --field")  # fmt: skip


def test_data_config_takes_one_path_or_several_as_a_tuple(tmp_path, capsys):
    """A path given as a string (a Python caller, an older run's config.json) is one path; the command line takes
    several after --data and --data.val-path; none after the option is refused in one line."""
    assert DataConfig(path="a.jsonl", val_path=["v.jsonl", "w.jsonl"]).path == ("a.jsonl",)
    old = to_dict(get_experiment("quick"))
    old["data"].update(path="/x/a.jsonl", val_path="/x/v.jsonl")  # what config.json held before lists
    assert (from_dict(old).data.path, from_dict(old).data.val_path) == (("/x/a.jsonl",), ("/x/v.jsonl",))
    cfg = cli.parse_train_args(["--data", "a.jsonl", "b.parquet", "--data.val-path", "v.jsonl", "w.jsonl"])
    assert (cfg.data.path, cfg.data.val_path) == (("a.jsonl", "b.parquet"), ("v.jsonl", "w.jsonl"))
    with pytest.raises(ConfigError, match=r"^data.path is empty \(no path after it\)"):
        DataConfig(path=[])
    for argv in (["train", "--data", "--max-steps", "1"], ["train", "--data.val-path"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        flag = argv[1]
        assert err == (f"error: {flag} is empty (no path after it); pass one or more data files or folders, or leave "
                       "it out\n"), err  # fmt: skip


def test_input_digest_of_one_path_is_the_one_an_older_run_recorded(tmp_path):
    """eval of a run rebuilds its validation split alone while its input files' digest is the one its checkpoints
    record: one path digests as it did (its files named data/NAME), so a run trained before several paths keeps
    that; several paths digest each file under its path's position, so their order counts."""
    a = _jsonl(tmp_path / "a.jsonl", ALPACA[:2])
    b = _jsonl(tmp_path / "b.jsonl", ALPACA[2:4])

    def reference(*named: tuple[str, str]) -> str:  # the digest as pipeline.input_digest took it of one path
        h = hashlib.sha1()
        for name, path in named:
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha1(Path(path).read_bytes()).digest())
        return h.hexdigest()[:16]

    assert input_digest(DataConfig(path=a, val_path=b)) == reference(("data/a.jsonl", a), ("val/b.jsonl", b))
    assert input_digest(DataConfig(path=(a, b))) == reference(("data[0]/a.jsonl", a), ("data[1]/b.jsonl", b))
    assert input_digest(DataConfig(path=(b, a))) != input_digest(DataConfig(path=(a, b)))


def test_a_run_on_several_files_trains_on_their_records_resumes_and_is_evaluated(tmp_path, capsys):
    """Reference: the same records in one file. Two files (JSON lines and Parquet) given as --data train on the same
    samples (fingerprint); config.json records both paths, absolute; --resume goes on and the files in another order
    are refused as other data; eval of the run without --data rebuilds its split from them, and eval --data takes
    both files."""
    first = _jsonl(tmp_path / "first.jsonl", ALPACA[:14])
    second = _parquet(tmp_path / "second.parquet", ALPACA[14:])
    both = _jsonl(tmp_path / "both.jsonl", ALPACA)
    common = ["--model.preset", "micro", "--data.tokenizer-vocab-size", "300", "--data.cache-dir",
              str(tmp_path / "cache"), "--data.max-length", "64", "--training.eval-every", "2"]  # fmt: skip
    cfg = cli.parse_train_args(["--data", first, second, *common])
    ref = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=(both,)))
    data = build_data(cfg)
    assert data.summary.fingerprint == build_data(ref).summary.fingerprint and len(data.val) > 0
    run = tmp_path / "run"
    train = ["train", "--data", first, second, *common, "--output-dir", str(run), "--save-every", "2"]
    assert cli.main([*train, "--max-steps", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["path"] == [first, second]
    assert cli.main([*train, "--max-steps", "3", "--resume"]) == 0
    capsys.readouterr()
    swapped = ["train", "--data", second, first, *common, "--output-dir", str(run), "--resume", "--max-steps", "4"]
    assert cli.main(swapped) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --resume: the data is not what this run trained on ({second} {first}: "), err
    assert cli.main(["eval", "--checkpoint", str(run), "--output-dir", str(tmp_path / "ev")]) == 0
    split = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert split["data"] == f"the validation split of the run {run}" and split["samples"] == len(data.val)
    assert (
        cli.main(["eval", "--checkpoint", str(run), "--data", first, second, "--output-dir", str(tmp_path / "e2")]) == 0
    )
    whole = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert (whole["data"], whole["samples"]) == (f"{first} {second}", len(ALPACA))


def test_bench_train_takes_several_data_paths_and_its_results_repeat_them(tmp_path):
    """bench train --data a b reads both files' lengths as training would; the command line its results record gives
    them after one --data (a second --data would replace the first), and a repeated --variant stays repeated."""
    from fasttune.bench.cli import command_line
    from fasttune.bench.workload import dataset_workload

    a = _jsonl(tmp_path / "a.jsonl", ALPACA[:6])
    b = _jsonl(tmp_path / "b.jsonl", ALPACA[6:12])
    argv = ["bench", "train", "--data", a, b, "--variant", "x:lora.rank=8", "--variant", "y:lora.rank=4"]
    args = cli.parse(argv)
    assert args.data == (a, b)
    assert command_line(args, "train") == ["train", *argv[2:]]
    again = cli.parse(["bench", *command_line(args, "train")])
    assert (again.data, again.variant) == (args.data, args.variant)
    lengths, _ = dataset_workload((a, b), None, 64, 0)
    assert lengths == dataset_workload((_jsonl(tmp_path / "ab.jsonl", ALPACA[:12]),), None, 64, 0)[0]
