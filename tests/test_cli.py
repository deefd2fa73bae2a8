"""The command line: each stage's defaults come from one table (STAGE_DEFAULTS), every numeric flag
carries its rule where it is added, and nanochat_one.run runs a stage as `python nanochat_one.py` does."""
import json

import pytest

import nanochat_one as nc
from conftest import cli_args


@pytest.mark.parametrize("argv,expected", [
    (["--stage", "base"], dict(lr_scale=1.0, matrix_lr=0.02, embedding_lr=0.05, copy_drills=0.2, model_tag="d4")),
    (["--stage", "base", "--data", "hf"], dict(copy_drills=0.0)),  # the drills are made for TinyWorld's text
    (["--stage", "mid"], dict(lr_scale=1.0, embedding_lr=0.05, copy_drills=0.0, temperature=0.6, max_new_tokens=256,
                              top_k=None)),
    (["--stage", "sft"], dict(lr_scale=0.125, matrix_lr=0.08, embedding_lr=0.0125, copy_drills=0.0)),
    (["--stage", "rl", "--depth", "6"], dict(lr_scale=0.05, temperature=1.0, max_new_tokens=128, model_tag="d6")),
    (["--stage", "chat"], dict(temperature=0.6, max_new_tokens=256, top_k=50)),
    (["--stage", "serve"], dict(top_k=50)),
    (["--stage", "sft", "--lr-scale", "0.5", "--matrix-lr", "0.01", "--top-k", "3", "--model-tag", "mine"],
     dict(lr_scale=0.5, matrix_lr=0.01, top_k=3, model_tag="mine")),  # a flag given wins
])
def test_unset_flags_take_their_stage_defaults(argv, expected):
    args = cli_args(*argv)
    assert {name: getattr(args, name) for name in expected} == expected


def test_help_quotes_the_defaults_table():
    assert nc.defaults_help("lr_scale") == "default 1.0; sft 0.125, rl 0.05"
    assert nc.defaults_help("steps") == "base 320, mid 100, sft 200, rl 100"
    assert nc.defaults_help("replay") == "default 0.0; mid 0.1, sft 0.03"
    assert nc.defaults_help("top_k") == "chat 50, serve 50"
    assert nc.defaults_help("embedding_lr") == "default 0.05; sft 0.0125"
    assert "(default 1.0; sft 0.125, rl 0.05)" in " ".join(nc.build_parser().format_help().split())


def test_every_numeric_flag_has_its_rule():
    """A numeric flag added without .must would take any value: only the seed and the speedrun's own
    wall time may."""
    numeric = {action.dest for action in nc.build_parser()._actions if action.type in (int, float)}
    ruled = {action.dest for action in nc.build_parser()._actions if hasattr(action, "must")}
    assert numeric - ruled == {"seed", "wall_seconds"}
    assert ruled <= numeric


def test_run_returns_the_summary_and_records_the_time_only_when_asked(base_dir):
    plan = nc.run(["--stage", "plan", "--depth", "2"])
    assert plan["params"] == sum(p.numel() for p in nc.meta_model(cli_args("--stage", "plan", "--depth", "2"),
                                                                 4096).parameters())
    flags = ["--stage", "tok", "--vocab-size", "300", "--tok-chars", "5000"]
    assert nc.run(flags) is None and not (base_dir / "report" / "wall.json").exists()
    nc.run(flags, record_time=True)
    assert list(json.loads((base_dir / "report" / "wall.json").read_text())) == ["tok"]
