"""Starting a stage (lmlab.stage, lmlab.checks): every bad value refused before any work with exit 2
and a message naming the flag, the value and what is allowed (and the same checks in the Python
API); splits checked against the block size before training; --overwrite; and --resume keeping the
run's own settings, applying a changed one with a line and refusing to change what defines the
run."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from flat_run import flatten

import lmlab
from lmlab import checkpoint, metrics
from lmlab.checks import SettingError, check, check_values, max_threads
from lmlab.cli import main
from lmlab.rundir import REPLACED_DIR
from lmlab.pretrain import pretrain
from lmlab.sample import generate
from lmlab.stage import STAGE_DEFAULTS, saved_settings
from lmlab.train import TrainConfig

TEXT = "the cat sat on the mat. the dog ran to the tree. a bird sang in the sun. " * 20
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    (root / "corpus.txt").write_text(TEXT)
    assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run", str(root / "base"),
                 "--steps", "6", "--lr", "0.005", "--eval-every", "3", "--save-every", "3",
                 *TINY]) == 0
    return root


# --- bad values: exit 2, one line naming the flag, the value and what is allowed ----------------

PRETRAIN_BAD = [
    (["--min-lr", "-1"], "--min-lr -1.0 is not allowed: expected a finite number >= 0"),
    (["--lr", "0.001", "--min-lr", "0.01"], "--min-lr 0.01 is not allowed: expected at most lr (0.001)"),
    (["--lr", "0"], "--lr 0.0 is not allowed: expected a finite number > 0"),
    (["--lr", "nan"], "--lr nan is not allowed"),
    (["--steps", "0"], "--steps 0 is not allowed: expected an integer >= 1"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1 is not allowed: expected a finite number >= 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0 is not allowed: expected a finite number >= 0"),
    (["--save-every", "-5"], "--save-every -5 is not allowed: expected an integer >= 0"),
    (["--eval-every", "-1"], "--eval-every -1 is not allowed: expected an integer >= 0"),
    (["--log-every", "-1"], "--log-every -1 is not allowed: expected an integer >= 1"),
    (["--log-every", "0"], "--log-every 0 is not allowed: expected an integer >= 1"),
    (["--warmup-steps", "-1"], "--warmup-steps -1 is not allowed"),
    (["--grad-accum", "0"], "--grad-accum 0 is not allowed: expected an integer >= 1"),
    (["--seed", "-1"], "--seed -1 is not allowed: expected an integer >= 0"),
    (["--keep", "-1"], "--keep-checkpoints -1 is not allowed: expected an integer >= 0"),
    (["--batch-size", "0"], "--batch-size 0 is not allowed: expected an integer >= 1"),
    (["--block-size", "100000000"], "--block-size 100000000 is not allowed: expected an integer >= 1 and <= 65536"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 is not allowed: expected a multiple of n_head (4)"),
    (["--vocab-size", "0"], "--vocab-size 0 is not allowed"),
    # A setting that applies only with another's value is refused, not silently ignored.
    (["--vocab-size", "300"], "--vocab-size 300 is not allowed: it sets a bpe tokenizer's size"),
    (["--tokenizer", "char", "--vocab-size", "300"], "leave it out, or use tokenizer 'bpe'"),
    (["--tokenizer", "bpe", "--vocab-size", "100"],
     "--vocab-size 100 is not allowed: expected >= 260 for a bpe tokenizer"),
    (["--val-fraction", "1"], "--val-fraction 1.0 is not allowed: expected a finite number >= 0 and < 1"),
    (["--threads", "100000"], f"--threads 100000 is not allowed: expected an integer >= 1 and <= {max_threads()}"),
    (["--threads", "0"], "--threads 0 is not allowed"),
    # An integer past a float's range is refused like any other too large (math.isfinite of it
    # raised OverflowError).
    (["--n-layer", "9" * 400], "--n-layer 999"),
]


@pytest.mark.parametrize("flags,message", PRETRAIN_BAD, ids=[(f[0][0] + f[0][-1])[:40] for f in PRETRAIN_BAD])
def test_pretrain_bad_values_exit_2_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    rc = main(["pretrain", "--corpus", str(tmp_path / "absent.txt"), "--run", str(out), *flags])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab pretrain: error: ") and message in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out.exists()  # the corpus (absent here) was not even read


OTHER_BAD = [
    (["sample", "R", "--num-samples", "0"], "--num-samples 0 is not allowed: expected an integer >= 1"),
    (["sample", "R", "--top-k", "0"], "--top-k 0 is not allowed: expected an integer >= 1"),
    (["sample", "R", "--top-p", "0"], "--top-p 0.0 is not allowed: expected a finite number > 0 and <= 1"),
    (["sample", "R", "--temperature", "-1"], "--temperature -1.0 is not allowed"),
    (["sample", "R", "--max-new-tokens", "-3"], "--max-new-tokens -3 is not allowed"),
    (["predict", "R", "--prompt", "a", "--top-k", "0"], "--top-k 0 is not allowed: expected an integer >= 1"),
    (["predict", "R", "--prompt", "a", "--top-k", "-2"], "--top-k -2 is not allowed"),
    (["chat", "R", "--top-p", "2"], "--top-p 2.0 is not allowed"),
    (["inspect-data", "R", "-n", "-1"], "-n -1 is not allowed: expected an integer >= 0"),
    (["rank", "R", "--prompts", "P", "--out", "O", "-k", "1"], "-k 1 is not allowed: expected an integer >= 2"),
    (["finetune", "R", "--corpus", "C", "--out", "O", "--freeze-layers", "-1"], "--freeze-layers -1 is not allowed"),
    (["finetune", "R", "--corpus", "C", "--out", "O", "--sample-tokens", "-1"], "--sample-tokens -1 is not allowed"),
    (["instruct", "R", "--out", "O", "--batch-size", "-4"], "--batch-size -4 is not allowed"),
    (["reward", "R", "--rankings", "X", "--out", "O", "--l2", "-1"], "--l2 -1.0 is not allowed"),
    (["dpo", "R", "--rankings", "X", "--out", "O", "--beta", "0"], "--beta 0.0 is not allowed: expected a finite number > 0"),
    (["dpo", "R", "--rankings", "X", "--out", "O", "--eval-judge", "shorter", "--eval-samples", "0"],
     "--eval-samples 0 is not allowed: expected an integer >= 1"),
    (["rlhf", "R", "--prompts", "P", "--judge", "shorter", "--out", "O", "-k", "1"], "-k 1 is not allowed"),
    (["rlhf", "R", "--prompts", "P", "--judge", "shorter", "--out", "O", "--kl-coef", "-1"], "--kl-coef -1.0 is not allowed"),
    (["bench", "kernels", "--repeat", "0"], "--repeat 0 is not allowed: expected an integer >= 1"),
    (["bench", "train", "--threads", "100000"], "--threads 100000 is not allowed"),
    (["bench", "generate", "--new-tokens", "0"], "--new-tokens 0 is not allowed"),
    (["sample", "R", "--max-new-tokens", "9" * 400], "is not allowed: expected an integer >= 0 and <= 16777216"),
]


@pytest.mark.parametrize("argv,message", OTHER_BAD, ids=[" ".join(a[:1] + a[-2:])[:60] for a, _ in OTHER_BAD])
def test_other_verbs_bad_values_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # R, O, P, ... do not exist: the value is refused before they are read
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_python_api_refuses_the_same_values():
    with pytest.raises(SettingError, match=r"min_lr=-1 is not allowed"):
        TrainConfig(min_lr=-1)
    with pytest.raises(SettingError, match=r"min_lr=0.5 is not allowed: expected at most lr"):
        TrainConfig(lr=0.1, min_lr=0.5)
    for name in ("weight_decay", "grad_clip"):
        with pytest.raises(SettingError, match=name):
            TrainConfig(**{name: -1.0})
    for name in ("save_every", "eval_every", "log_every"):
        with pytest.raises(SettingError, match=name):
            TrainConfig(**{name: -1})
    with pytest.raises(SettingError, match="steps=True"):
        TrainConfig(steps=True)  # a bool is not a step count
    with pytest.raises(SettingError, match="top_k=0"):
        check_values(top_k=0)
    with pytest.raises(SettingError, match="threads=100000"):
        check("threads", 100000)
    with pytest.raises(SettingError, match="batch_size=0"):
        pretrain("x", "never", batch_size=0)
    with pytest.raises(TypeError, match="unknown keyword"):
        pretrain("x", "never", batchsize=4)
    with pytest.raises(SettingError, match="vocab_size=300 is not allowed"):
        pretrain("x", "never", tokenizer="char", vocab_size=300)
    # Switches and paths are checked too: "no" is not False, and 5 is not a corpus.
    for settings, message in [({"progress": "no"}, "progress='no' is not allowed: expected True or "
                                                   "False"),
                              ({"resume": "yes"}, "resume='yes' is not allowed"),
                              ({"overwrite": 1}, "overwrite=1 is not allowed"),
                              ({"corpus": 5}, "corpus=5 is not allowed: expected a path or "
                                              "builtin:NAME")]:
        settings = {"corpus": "x", **settings}
        with pytest.raises(SettingError, match=message):
            pretrain(settings.pop("corpus"), "never", **settings)
    assert not os.path.exists("never")


def test_generate_refuses_bad_sampling_values(root):
    model, tok, _ = checkpoint.load_model(root / "base")
    for kwargs, name in [(dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
                         (dict(temperature=float("inf")), "temperature")]:
        with pytest.raises(SettingError, match=name):
            generate(model, [1, 2], 3, **kwargs)
    with pytest.raises(SettingError, match="max_new_tokens=-1"):
        generate(model, [1, 2], -1)


# --- data against the block size, before training -----------------------------------------------

def test_short_validation_split_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("abcdefghij" * 20)  # 200 chars: a 10% split has 20
    argv = ["pretrain", "--corpus", str(tmp_path / "short.txt"), "--run", str(tmp_path / "r"),
            "--steps", "2", *TINY[:6], "--block-size", "32", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "validation split" in err and "has 20 tokens" in err and "needs 33" in err
    assert not (tmp_path / "r").exists()
    # With evaluation off the validation split is not needed.
    assert main(argv + ["--eval-every", "0"]) == 0


def test_finetune_checks_its_corpus_against_the_block_size(root, tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("the cat.")
    assert main(["finetune", str(root / "base"), "--corpus", str(tmp_path / "tiny.txt"), "--out",
                 str(tmp_path / "ft"), "--no-progress"]) == 2
    assert "training split" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


# --- overwrite -----------------------------------------------------------------------------------

def test_overwrite_replaces_a_run_and_says_what_it_replaced(root, tmp_path, capsys):
    out = tmp_path / "ft"
    ft = ["finetune", str(root / "base"), "--corpus", str(root / "corpus.txt"), "--out", str(out),
          "--steps", "2", "--eval-every", "0", "--sample-tokens", "0", "--no-progress"]
    assert main(ft) == 0
    capsys.readouterr()
    assert main(ft) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(ft + ["--overwrite", "--lr", "0.002"]) == 0
    err = capsys.readouterr().err
    assert f"--overwrite replaces the run in {out} (" in err and "checkpoints/" in err
    assert not os.path.lexists(out / REPLACED_DIR)
    assert checkpoint.read_config(out)["train"]["optim"]["lr"] == 0.002
    assert main(ft + ["--overwrite", "--resume"]) == 2
    # A run may not be written into its own parent.
    assert main(["finetune", str(root / "base"), "--corpus", str(root / "corpus.txt"), "--out",
                 str(root / "base"), "--overwrite", "--no-progress"]) == 2
    assert "the run it starts from" in capsys.readouterr().err
    assert checkpoint.load_model(root / "base")  # untouched


# --- resume keeps the run's settings -------------------------------------------------------------

def test_resume_takes_every_setting_from_the_run(root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run", str(run), "--steps",
                 "4", "--lr", "0.005", "--warmup-steps", "2", "--eval-every", "2", *TINY]) == 0
    capsys.readouterr()
    # Only --steps given: lr, batch size, warmup and the rest are the run's, and one line says
    # what changed.
    assert main(["pretrain", "--run", str(run), "--resume", "--steps", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "lmlab: steps changed from 4 to 6" in err and "lr" not in err
    train = checkpoint.read_config(run)["train"]
    assert train["optim"]["lr"] == 0.005 and train["optim"]["warmup_steps"] == 2
    assert train["settings"]["batch_size"] == 4 and train["batch_size"] == 4
    assert checkpoint.load_training_state(run)[1]["step"] == 6
    # The same value again is no change; another lr is applied, with its line.
    assert main(["pretrain", "--run", str(run), "--resume", "--steps", "8", "--lr", "0.005",
                 "--min-lr", "0.0001", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "lr changed" not in err.replace("min_lr changed", "")
    assert "min_lr changed from 0.0005 to 0.0001" in err
    # What defines the run (model, data, batches, seed, precision) cannot change.
    for flags, name in [(["--batch-size", "8"], "--batch-size 8"), (["--n-embd", "32"], "--n-embd 32"),
                        (["--corpus", str(root / "base")], "--corpus"), (["--seed", "1"], "--seed 1")]:
        assert main(["pretrain", "--run", str(run), "--resume", "--steps", "9", *flags]) == 2
        err = capsys.readouterr().err
        assert name in err and "a resumed run keeps its model, data and batches" in err, err
        assert "changed from" not in err  # a refused resume reports only why
    # A resume refused by a relation between settings says only why, too.
    assert main(["pretrain", "--run", str(run), "--resume", "--steps", "9", "--lr", "0.00001"]) == 2
    err = capsys.readouterr().err
    assert "--min-lr 0.0001 is not allowed: expected at most lr" in err and "changed from" not in err
    # Fewer steps than the run has trained cannot be a resume's target.
    assert main(["pretrain", "--run", str(run), "--resume", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--steps 5 is not allowed: the run has already trained 8 steps" in err, err
    assert "changed from" not in err
    assert checkpoint.load_training_state(run)[1]["step"] == 8
    # Resuming a finished run trains nothing and reports the losses it logged last (a line that
    # is not an object, edited in by hand, is passed over).
    rows = [r for r in metrics.read_metrics(run) if "val_loss" in r]
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1]\n")
    result = lmlab.pretrain(run=run, resume=True, steps=8, progress=False).result
    assert result.steps_done == 8 and result.final_loss == rows[-1]["loss"]
    assert result.val_loss == rows[-1]["val_loss"]
    assert "already finished 8 of 8 steps" in capsys.readouterr().err


def test_paths_given_as_path_objects_are_recorded_as_text(root, tmp_path):
    """A corpus given as a pathlib.Path is recorded as config.json holds it, so resuming with the
    same Path is no change."""
    from pathlib import Path
    run = tmp_path / "run"
    pretrain(Path(root / "corpus.txt"), run, steps=2, n_layer=1, n_head=2, n_embd=16,
             block_size=16, batch_size=4, progress=False)
    assert checkpoint.read_config(run)["train"]["settings"]["corpus"] == str(root / "corpus.txt")
    pretrain(Path(root / "corpus.txt"), run, resume=True, steps=3, progress=False)
    assert checkpoint.load_training_state(run)[1]["step"] == 3


def test_a_run_is_resumed_only_by_the_stage_that_made_it(root, tmp_path, capsys):
    """pretrain --resume on a fine-tuned run would thaw its frozen layers and drop its parent;
    other verbs would fail on its state. Each is refused in one line naming the right verb."""
    ft = tmp_path / "ft"
    assert main(["finetune", str(root / "base"), "--corpus", str(root / "corpus.txt"), "--out",
                 str(ft), "--steps", "2", "--freeze-layers", "1", "--sample-tokens", "0",
                 "--no-progress"]) == 0
    before = (checkpoint.current_checkpoint(ft) / "model.safetensors").read_bytes()
    capsys.readouterr()
    for argv in (["pretrain", "--run", str(ft)], ["instruct", str(root / "base"), "--out", str(ft)],
                 ["dpo", str(root / "base"), "--out", str(ft)]):
        assert main([*argv, "--resume", "--steps", "4", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{argv[0]} cannot resume {ft}: it holds a run made by lmlab finetune: resume it " \
               "with lmlab finetune --resume" in err, err
        assert err.count("\n") == 1 and "changed from" not in err
    assert (checkpoint.current_checkpoint(ft) / "model.safetensors").read_bytes() == before
    assert main(["finetune", str(root / "base"), "--out", str(ft), "--resume", "--steps", "3",
                 "--no-progress"]) == 0


@pytest.mark.parametrize("made_by", ["instruct", "rlhf", "dpo"])
def test_the_refusal_of_another_stage_reads_as_english(tmp_path, made_by):
    """The refusal named the run's stage after an article: 'it holds a instruct run'."""
    from lmlab.errors import RunDirError
    from lmlab.stage import _check_made_by
    with pytest.raises(RunDirError) as e:
        _check_made_by("pretrain", tmp_path, made_by)
    message = str(e.value)
    assert not re.search(r"\ba (instruct|rlhf)\b", message), message
    assert message.startswith(f"pretrain cannot resume {tmp_path}: ")
    assert message.endswith(f"resume it with lmlab {made_by} --resume")


def test_a_run_is_resumed_only_from_the_run_it_started_from(root, tmp_path, capsys):
    """finetune --resume names the parent again; another run was taken silently: its tokenizer
    encoded the corpus (another character for each id when the sizes agree, as here), its
    losses were the report's "before", and config.json named it as the parent."""
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text(TEXT.upper())      # as many characters, other ids
    other, ft = tmp_path / "other", tmp_path / "ft"
    assert main(["pretrain", "--corpus", str(other_corpus), "--run", str(other), "--steps", "1",
                 "--eval-every", "0", *TINY]) == 0
    assert main(["finetune", str(root / "base"), "--corpus", str(root / "corpus.txt"), "--out",
                 str(ft), "--steps", "2", "--sample-tokens", "0", "--no-progress"]) == 0
    before = (checkpoint.current_checkpoint(ft) / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["finetune", str(other), "--out", str(ft), "--resume", "--steps", "3",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"finetune cannot resume {ft} from {other}: it was started from {root / 'base'}, and "
            "a resumed run continues from the run it started from") in err, err
    assert (checkpoint.current_checkpoint(ft) / "model.safetensors").read_bytes() == before
    # The same parent under another spelling resumes.
    assert main(["finetune", str(root / "base" / ".." / "base"), "--out", str(ft), "--resume",
                 "--steps", "3", "--sample-tokens", "0", "--no-progress"]) == 0


def test_resume_of_a_run_without_recorded_settings_uses_its_optimiser_section(root, tmp_path):
    """Runs written before the settings were recorded as one dict (config.json's train section
    holds optim, batch_size, corpus, model) resume with their own values."""
    run = tmp_path / "old"
    pretrain(str(root / "corpus.txt"), run, n_layer=1, n_head=2, n_embd=16, block_size=16,
             batch_size=3, steps=2, lr=0.004, eval_every=0, progress=False)
    flatten(run)  # as main wrote runs before this change: one checkpoint's files at the top
    config = json.loads((run / "config.json").read_text())
    del config["train"]["settings"]
    (run / "config.json").write_text(json.dumps(config))
    saved = saved_settings("pretrain", checkpoint.read_config(run)["train"])
    assert saved["batch_size"] == 3 and saved["lr"] == 0.004 and saved["n_embd"] == 16
    result = pretrain(run_dir=run, resume=True, steps=3, progress=False)
    assert result.steps_done == 3
    assert checkpoint.read_config(run)["train"]["optim"]["lr"] == 0.004


def test_dpo_defaults_are_one_table(capsys):
    """The command line shows and uses the stage's defaults; the Python function uses the same."""
    from lmlab.cli import build_parser

    args = build_parser().parse_args(["dpo", "r", "--rankings", "x", "--out", "o"])
    assert args.beta is None and args.sft_weight is None  # not given: the table decides
    assert STAGE_DEFAULTS["dpo"]["beta"] == 0.5 and STAGE_DEFAULTS["dpo"]["sft_weight"] == 1.0
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "DPO temperature (default 0.5)" in help_text
    assert "--resume" in help_text and "changed from X to Y" in help_text


@pytest.mark.parametrize("verb", ["pretrain", "finetune", "instruct", "reward", "dpo", "rlhf"])
def test_every_training_verb_refuses_an_existing_run(root, tmp_path, capsys, verb):
    exists = tmp_path / "exists"
    shutil.copytree(root / "base", exists)
    before = sorted(p.relative_to(exists) for p in exists.rglob("*"))
    argv = {"pretrain": ["pretrain", "--corpus", "C", "--run", str(exists)],
            "finetune": ["finetune", str(root / "base"), "--corpus", "C", "--out", str(exists)],
            "instruct": ["instruct", str(root / "base"), "--out", str(exists)],
            "reward": ["reward", str(root / "base"), "--rankings", "X", "--out", str(exists)],
            "dpo": ["dpo", str(root / "base"), "--rankings", "X", "--out", str(exists)],
            "rlhf": ["rlhf", str(root / "base"), "--prompts", "P", "--judge", "shorter", "--out",
                     str(exists)]}[verb]
    assert main(argv + ["--no-progress"] * (verb != "reward")) == 2
    err = capsys.readouterr().err
    assert f"{exists} already holds a run; pass " in err and "--overwrite to replace it" in err
    assert ("--resume" in err) == (verb != "reward")  # a reward model is fitted in one go
    assert sorted(p.relative_to(exists) for p in exists.rglob("*")) == before


def test_threads_given_to_a_stage_are_used_and_recorded(root, tmp_path):
    """--threads (threads=) sets the kernels' thread count for the stage, and config.json records
    the count the run trained with."""
    from lmlab import ops
    before = ops.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run", str(tmp_path / "t"),
                     "--steps", "1", "--eval-every", "0", "--threads", str(want), *TINY]) == 0
        assert ops.get_num_threads() == want
        assert checkpoint.read_config(tmp_path / "t")["train"]["threads"] == want
    finally:
        ops.set_num_threads(before)


def test_a_bpe_vocabulary_smaller_than_asked_is_said_and_recorded_as_it_is(root, tmp_path, capsys):
    """A corpus with too few distinct pairs yields fewer BPE tokens than vocab_size: a line says so,
    the model (and tokenizer) record the real size, and the setting keeps the value asked."""
    out = tmp_path / "bpe"
    assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run", str(out), "--steps", "1",
                 "--eval-every", "0", "--tokenizer", "bpe", "--vocab-size", "5000", *TINY]) == 0
    config = checkpoint.read_config(out)
    real = config["model"]["vocab_size"]
    assert real < 5000 and config["tokenizer"]["vocab_size"] == real
    assert config["train"]["settings"]["vocab_size"] == 5000
    assert (f"lmlab: BPE: the corpus yields only {real} tokens of the 5000 asked (vocab_size); "
            f"the model has {real} (config.json: model.vocab_size)") in capsys.readouterr().err


def test_zero_on_one_process_is_noted_not_ignored(root, tmp_path, capsys):
    """zero 1 (ZeRO-1) shards the AdamW state across MPI ranks; given to a one-process run it is
    said to change nothing (one rank keeps the whole state), and the run is the zero 0 run."""
    args = ["pretrain", "--corpus", str(root / "corpus.txt"), "--steps", "2", "--eval-every", "0",
            *TINY]
    capsys.readouterr()
    assert main([*args, "--run", str(tmp_path / "z1"), "--zero", "1"]) == 0
    assert ("lmlab: note: zero 1 shards the AdamW state across MPI ranks (mpiexec -n N); this run "
            "is one process, which keeps the whole state") in capsys.readouterr().err
    assert main([*args, "--run", str(tmp_path / "z0")]) == 0
    assert "zero" not in capsys.readouterr().err
    assert checkpoint.read_config(tmp_path / "z1")["train"]["settings"]["zero"] == 1
    a, _, _ = checkpoint.load_model(tmp_path / "z1")
    b, _, _ = checkpoint.load_model(tmp_path / "z0")
    assert a.params.tobytes() == b.params.tobytes()
    pretrain(str(root / "corpus.txt"), tmp_path / "api", steps=1, eval_every=0, n_layer=1,
             n_head=2, n_embd=16, block_size=16, batch_size=4, progress=False, zero=1)
    assert "lmlab: note: zero 1" in capsys.readouterr().err
