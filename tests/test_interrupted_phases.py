"""What an interruption outside the training steps leaves behind: the tokenizer cache (a power cut after its rename
but before its bytes reached the disk, a kill while it is written), ... The next run works and trains the losses of a
run that was never interrupted."""

import dataclasses
import logging
import os
import time
from pathlib import Path

import pytest
from helpers import losses, tiny_config

from fasttune.data import tokenizer as tokenizers
from fasttune.train import loop


def _short(tmp, name):
    return tiny_config(tmp / name, max_steps=2, eval_every=0, save_every=2)


def _cached(cfg):
    (folder,) = [p for p in Path(cfg.data.cache_dir).iterdir() if p.name.startswith("tokenizer-")]
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run and its (complete) cached tokenizer."""
    cfg = _short(tmp_path_factory.mktemp("ref"), "ref")
    return cfg, losses(loop.train(cfg).records), _cached(cfg)


@pytest.mark.parametrize("damage", ["emptied", "cut short", "file missing"])
def test_a_damaged_cached_tokenizer_is_trained_again_with_the_same_losses(reference, tmp_path, caplog, damage):
    """A power cut after the cache's rename can leave its files empty (their bytes never reached the disk); a cut file
    or one deleted by hand is damage too. The next run said nothing and crashed with a JSONDecodeError traceback; now
    it warns naming the folder, trains the tokenizer again (the same one) and replaces the cache."""
    _, want, cached = reference
    cfg = _short(tmp_path, "run")
    cache = Path(cfg.data.cache_dir)
    cache.mkdir()
    copy = cache / cached.name
    copy.mkdir()
    for f in cached.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    text = (copy / "tokenizer.json").read_bytes()
    if damage == "emptied":
        (copy / "tokenizer.json").write_bytes(b"")
    elif damage == "cut short":
        (copy / "tokenizer.json").write_bytes(text[: len(text) // 2])
    else:
        (copy / "tokenizer.json").unlink()
    caplog.set_level(logging.INFO, logger="fasttune")
    assert losses(loop.train(cfg).records) == want
    assert f"the cached tokenizer {copy} does not load" in caplog.text and "training it again" in caplog.text
    assert (copy / "tokenizer.json").read_bytes() == text  # replaced by a complete one
    assert sorted(p.name for p in cache.iterdir()) == [copy.name]  # nothing else left in the cache


def test_a_tokenizer_cache_write_cut_short_leaves_nothing_and_a_killed_ones_temporary_goes(tmp_path, monkeypatch):
    """Ctrl-C while the tokenizer is being written leaves no temporary folder; one a kill -9 left (older than any save
    takes) is removed by the next run that writes the cache, and a fresh one (another run writing now) is not."""
    cfg = _short(tmp_path, "run")
    cache = Path(cfg.data.cache_dir)
    real = tokenizers.PreTrainedTokenizerFast.save_pretrained

    def interrupted(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizers.PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    killed, live = cache / ".tmp-tokenizer-killed", cache / ".tmp-tokenizer-live"
    for folder in (killed, live):
        folder.mkdir()
        (folder / "tokenizer.json").write_text("{")
    old = time.time() - tokenizers.STALE_AFTER_S - 60
    os.utime(killed, (old, old))
    loop.train(dataclasses.replace(cfg))
    assert not killed.exists() and live.exists()
    assert (_cached(cfg) / "tokenizer.json").is_file()


def test_the_cached_tokenizer_folder_gets_the_permissions_of_a_normal_mkdir(tmp_path):
    """A data.cache_dir shared by several users: the cached folder is what mkdir makes under the umask (0755 under
    022, 0775 under 002), not tempfile.mkdtemp's 0700, which the others could not read."""
    cache = tmp_path / "cache"
    for umask in (0o022, 0o002):
        old = os.umask(umask)
        try:
            tokenizers.cached_tokenizer(["def f(x):\n    return x\n"] * 20, 300, str(cache), f"umask{umask:o}")
            (tmp_path / f"plain{umask:o}").mkdir()
        finally:
            os.umask(old)
        cached = cache / f"tokenizer-umask{umask:o}-300"
        assert (cached / "tokenizer.json").is_file()
        assert oct(cached.stat().st_mode & 0o777) == oct((tmp_path / f"plain{umask:o}").stat().st_mode & 0o777)


def test_a_tokenizer_another_rank_cached_meanwhile_is_used_not_moved_aside(tmp_path, monkeypatch, caplog):
    """torchrun's ranks (or two runs sharing data.cache_dir) each train the tokenizer when none is cached; the one that
    finishes last took the first one's complete cache for damage and moved it aside and deleted it, so a rank loading it
    in that moment failed. Now a cache that loads is used as it is, and no temporary is left."""
    texts, cache = ["def f(x):\n    return x\n"] * 20, tmp_path / "cache"
    cached, real, first = cache / "tokenizer-shared-300", tokenizers.train_tokenizer, []

    def other_rank_first(*args):
        monkeypatch.setattr(tokenizers, "train_tokenizer", real)
        tokenizers.cached_tokenizer(texts, 300, str(cache), "shared")  # rank 0 caches it while this rank trains
        first.append(cached.stat().st_ino)
        return real(*args)

    monkeypatch.setattr(tokenizers, "train_tokenizer", other_rank_first)
    caplog.set_level(logging.INFO, logger="fasttune")
    tok = tokenizers.cached_tokenizer(texts, 300, str(cache), "shared")
    assert cached.stat().st_ino == first[0]  # rank 0's folder stayed in place all along
    assert "does not load" not in caplog.text
    assert tok("return x")["input_ids"] == tokenizers.AutoTokenizer.from_pretrained(cached)("return x")["input_ids"]
    assert [p.name for p in cache.iterdir()] == [cached.name]
