"""Puts the project's root on sys.path, so that `pytest tests/test_train.py` alone finds its
modules; generates the tiny toy corpus once for every test file that reads one, and runs the
tiny pipeline once for every test that needs a finished run."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (needs the path above)
import train  # noqa: E402

# The shared run's step counts: the tiny preset with fewer teacher, encoder and omni steps (its
# align_steps, ckpt_every and eval_per_family are the preset's, spelled out). A test that trains
# on top of the shared run's stages passes these too, or its stages would be refused as made with
# other settings.
RUN_STEPS = ["--teacher_steps", "6", "--encoder_steps", "4", "--omni_steps", "6",
             "--align_steps", "4", "--ckpt_every", "2", "--eval_per_family", "4"]
ALIGN_RUNS = (["--method", "sft"], ["--method", "kd"], ["--method", "gkd"],
              ["--method", "xopd", "--lam", "0"], ["--method", "xopd", "--lam", "1"])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The folder of the tiny toy corpus, seed 0 (a manifest per pool, text.jsonl, wavs/,
    tokenizer.json)."""
    d = str(tmp_path_factory.mktemp("data"))
    data.make_toy_data(d, seed=0, preset="tiny")
    return d


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """One finished run for the whole test session: the default pipeline (teacher -> encoder ->
    omni -> xopd -> eval) on the tiny preset with RUN_STEPS, then every other method and the λ
    ablation on the same base. Read it freely; a test that writes into a run copies it first
    (shutil.copytree), so this one stays as made."""
    out = tmp_path_factory.mktemp("run")
    argv = ["--preset", "tiny", "--out", str(out), "--data", tiny_data, *RUN_STEPS]
    train.main(argv)
    for extra in ALIGN_RUNS:
        train.main([*argv, *extra])
    return out
