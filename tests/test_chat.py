"""The chat stages end to end on tiny settings: mid-training and SFT reduce their validation loss."""
import pytest

from conftest import TINY, TINY_TOK, run_stage


def test_tiny_mid_and_sft_reduce_loss(base_dir):
    run_stage(*TINY_TOK)
    run_stage("--stage", "base", *TINY, "--num-iterations", "20", "--eval-every", "0")
    common = [*TINY, "--eval-every", "10", "--eval-items", "4"]
    mid = run_stage("--stage", "mid", *common, "--num-iterations", "20")
    losses = [h["val_loss"] for h in mid["history"]]
    assert losses[-1] < 0.8 * losses[0]
    sft = run_stage("--stage", "sft", *common, "--num-iterations", "20", "--lr-scale", "0.5")
    losses = [h["val_loss"] for h in sft["history"]]
    assert losses[-1] < losses[0]
    assert set(sft["chat_eval"]) == {"multiple_choice_letter", "multiple_choice_cloze", "world_knowledge", "arithmetic",
                                     "word_problem", "hard_word_problem", "names_subject", "keeps_name",
                                     "completes_fact"}
    assert 0 < sft["induction"]["first"] and sft["induction"]["ratio"] == pytest.approx(
        sft["induction"]["second"] / sft["induction"]["first"], abs=2e-3)
