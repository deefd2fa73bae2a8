"""The statistics a reviewer accepts: Wilson intervals, paired comparisons on the same items, McNemar's
counts and pass@k with its standard error, each against an oracle worked out here (closed forms in exact
fractions, a bisection on the score statistic), and per-item outcomes that line up across checkpoints
and ranks."""
import json
import math
from fractions import Fraction

import pytest

import bpe
import nanochat_one as nc
import report
import tinyworld

Z = Fraction(196, 100)  # the z of a 95% interval, as wilson_interval's default


def score_statistic(p, q, n):
    """How many standard errors of a true accuracy q the measured p lies from it: |p - q| / sqrt(q(1-q)/n)."""
    return abs(p - q) / math.sqrt(q * (1 - q) / n)


def bisect_bound(p, n, low, high):
    """The q in (low, high) where the score statistic crosses z, by bisection: the statistic falls
    from the end of [low, high] away from p to the end nearest p (an oracle that knows no formula)."""
    far_is_low = abs(low - p) > abs(high - p)
    for _ in range(200):
        mid = (low + high) / 2
        if (score_statistic(p, mid, n) > float(Z)) == far_is_low:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def test_wilson_at_zero_and_all_is_the_closed_form():
    # at p = 0 the upper bound solves q = z * sqrt(q(1-q)/n): q = z^2 / (n + z^2), in exact fractions
    upper = Z ** 2 / (200 + Z ** 2)
    assert upper == Fraction(38416, 2038416)
    low, high = report.wilson_interval(0, 200)
    assert low == 0.0 and high == pytest.approx(float(upper), rel=1e-12)
    low, high = report.wilson_interval(200, 200)  # the mirror image at p = 1
    assert high == 1.0 and low == pytest.approx(float(1 - upper), rel=1e-12)
    assert nc.accuracy_stats(0, 200)["stderr"] == 0.0  # what the interval is for: the normal s.e. says nothing here
    assert report.wilson_interval(0, 0) == (0.0, 1.0)  # no items: nothing known


@pytest.mark.parametrize("correct, total", [(0, 200), (1, 200), (3, 4), (100, 400), (222, 400), (199, 200), (20, 20)])
def test_wilson_bounds_are_where_the_score_statistic_equals_z(correct, total):
    p = correct / total
    low, high = report.wilson_interval(correct, total)
    assert 0.0 <= low <= p <= high <= 1.0
    if correct > 0:
        assert score_statistic(p, low, total) == pytest.approx(float(Z), rel=1e-9)
        assert low == pytest.approx(bisect_bound(p, total, 1e-300, p), abs=1e-12)
    if correct < total:
        assert score_statistic(p, high, total) == pytest.approx(float(Z), rel=1e-9)
        assert high == pytest.approx(bisect_bound(p, total, p, 1 - 1e-16), abs=1e-12)


def test_wilson_is_near_the_normal_interval_when_many_are_right_and_wrong():
    stats = nc.accuracy_stats(222, 400)
    low, high = stats["interval"]
    assert low == pytest.approx(0.555 - 1.96 * stats["stderr"], abs=5e-4)
    assert high == pytest.approx(0.555 + 1.96 * stats["stderr"], abs=1e-3)


def test_accuracy_stats_keeps_its_keys_and_the_outcomes_and_survives_json():
    stats = nc.accuracy_stats(3, 4, outcomes=[True, True, False, True])
    assert stats["accuracy"] == 0.75 and stats["items"] == 4 and stats["stderr"] == math.sqrt(0.75 * 0.25 / 4)
    assert stats["outcomes"] == [1, 1, 0, 1]
    assert stats["interval"] == list(report.wilson_interval(3, 4))
    assert json.loads(json.dumps(stats)) == stats  # the report files keep it as it is
    assert "outcomes" not in nc.accuracy_stats(3, 4)
    assert nc.share_of([True, False, True, True]) == nc.accuracy_stats(3, 4, [1, 0, 1, 1])


def test_paired_difference_by_hand():
    before, after = [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]
    change = nc.paired_difference(before, after)
    # d = [0, -1, 1, 1, 0]: mean 1/5; sum of squared deviations sum(d^2) - n mean^2 = 3 - 1/5 = 14/5
    variance = (3 - 5 * Fraction(1, 5) ** 2) / 4  # divided by n - 1
    assert variance == Fraction(7, 10)
    assert change["difference"] == pytest.approx(0.2, abs=1e-15)
    assert change["stderr"] == pytest.approx(math.sqrt(variance / 5), rel=1e-12)
    assert change["z"] == pytest.approx(1 / math.sqrt(3), rel=1e-12)  # McNemar: (2 - 1) / sqrt(2 + 1)
    assert (change["lost"], change["gained"], change["items"]) == (1, 2, 5)
    with pytest.raises(ValueError):
        nc.paired_difference([1, 0], [1, 0, 1])


def test_paired_is_tighter_than_unpaired_on_the_same_items():
    # 400 items: 200 right both times, 10 right only before, 40 right only after, 150 wrong both times
    before = [1] * 200 + [1] * 10 + [0] * 40 + [0] * 150
    after = [1] * 200 + [0] * 10 + [1] * 40 + [0] * 150
    change = nc.paired_difference(before, after)
    assert change["difference"] == pytest.approx(30 / 400, abs=1e-15)
    variance = (50 - 400 * Fraction(30, 400) ** 2) / 399  # d: forty +1, ten -1, the rest 0
    assert change["stderr"] == pytest.approx(math.sqrt(variance / 400), rel=1e-12)
    assert change["z"] == pytest.approx(30 / math.sqrt(50), rel=1e-12)
    assert (change["lost"], change["gained"]) == (10, 40)
    first, second = nc.accuracy_stats(210, 400), nc.accuracy_stats(240, 400)
    unpaired = math.hypot(first["stderr"], second["stderr"])
    assert unpaired == pytest.approx(math.sqrt((0.525 * 0.475 + 0.6 * 0.4) / 400), rel=1e-12)
    assert change["stderr"] < 0.5 * unpaired  # the shared items' luck cancels


def test_paired_difference_at_the_ends_stays_finite():
    change = nc.paired_difference([0] * 200, [1] * 200)  # every item from wrong to right
    assert change["difference"] == 1.0 and change["stderr"] == 0.0
    assert change["z"] == pytest.approx(math.sqrt(200), rel=1e-12)  # McNemar: 200 / sqrt(200), not infinity
    nothing = nc.paired_difference([1, 0, 1], [1, 0, 1])
    assert [nothing[key] for key in ("difference", "stderr", "z", "lost", "gained")] == [0, 0, 0, 0, 0]


def test_pass_at_k_stats_by_hand():
    stats = nc.pass_at_k_stats([[1, 1], [1, 0], [0, 0]])
    # per problem: pass@1 1, 1/2, 0 (mean 1/2, sample variance 1/4); pass@2 1, 1, 0 (mean 2/3, variance 1/3)
    assert stats["pass1"] == 0.5 and stats["pass1_stderr"] == pytest.approx(math.sqrt(Fraction(1, 4) / 3), rel=1e-12)
    assert stats["passk"] == pytest.approx(2 / 3, rel=1e-15)
    assert stats["passk_stderr"] == pytest.approx(1 / 3, rel=1e-12)  # sqrt((1/3) / 3)
    one = nc.pass_at_k_stats([[1], [0], [1], [1]])  # k = 1: pass@1 and pass@k agree
    assert one["pass1"] == one["passk"] == 0.75 and one["pass1_stderr"] == one["passk_stderr"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 7, 12])
def test_gather_in_order_puts_every_rank_share_back_in_item_order(monkeypatch, world_size, n):
    items = [f"item {i}" for i in range(n)]
    ddp = nc.Dist(rank=world_size - 1, world_size=world_size)

    def all_gather_object(shares, mine):  # what every rank would send: its own shard, scored
        assert mine == [x.upper() for x in nc.shard(items, ddp)]
        shares[:] = [[x.upper() for x in nc.shard(items, nc.Dist(rank=r, world_size=world_size))]
                     for r in range(world_size)]

    monkeypatch.setattr(nc.dist, "all_gather_object", all_gather_object)
    assert nc.gather_in_order(ddp, [x.upper() for x in nc.shard(items, ddp)]) == [x.upper() for x in items]


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train(["the cat sat on the mat 0123456789 #" * 20], 300, special_tokens=nc.SPECIAL_TOKENS)


def scripted_engine(tok, items, right):
    """A stand-in for Engine whose greedy reply to item i's question is right when right(i)."""
    index = {item["question"]: i for i, item in enumerate(items)}

    class ScriptedEngine:
        def __init__(self, model, tokenizer):
            pass

        def generate_batch(self, prompts, k, max_tokens, temperature, seed=0):
            rows = []
            for prompt in prompts:
                i = index[tok.decode(prompt).split("<|user_start|>")[1].split("<|user_end|>")[0]]
                rows.append(tok.encode_ordinary(f"#### {items[i]['answer'] if right(i) else -1}"))
            return rows, None

    return ScriptedEngine


def test_outcomes_line_up_item_by_item_across_checkpoints_and_ranks(tok, monkeypatch):
    items = tinyworld.tinyworld_eval_items("word_problem", n=7)
    monkeypatch.setattr(nc, "Engine", scripted_engine(tok, items, lambda i: i % 3 == 0))  # "before": items 0, 3, 6
    before = nc.evaluate_generative(None, tok, items, nc.Dist(), "word_problem")
    assert before["outcomes"] == [1, 0, 0, 1, 0, 0, 1] and before["accuracy"] == 3 / 7

    # "after", on two ranks: rank 1 answers items 1, 3, 5 itself and receives rank 0's replies to 0, 2, 4, 6
    right_after = lambda i: i != 3 and i % 2 == 1 or i == 0  # noqa: E731
    monkeypatch.setattr(nc, "Engine", scripted_engine(tok, items, right_after))

    def all_gather_object(shares, mine):
        shares[:] = [[(item, f"#### {item['answer'] if right_after(items.index(item)) else -1}")
                      for item in nc.shard(items, nc.Dist(rank=r, world_size=2))] for r in range(2)]
        assert shares[1] == mine  # what rank 1 generated agrees with what the stand-in says it sent

    monkeypatch.setattr(nc.dist, "all_gather_object", all_gather_object)
    after = nc.evaluate_generative(None, tok, items, nc.Dist(rank=1, world_size=2), "word_problem")
    assert after["outcomes"] == [1, 1, 0, 0, 0, 1, 0]

    change = nc.paired_difference(before["outcomes"], after["outcomes"])
    assert (change["lost"], change["gained"]) == (2, 2)  # items 3 and 6 lost; 1 and 5 gained
    assert change["difference"] == 0.0 and change["z"] == 0.0


def test_chat_changes_pair_mid_with_sft_and_rl_on_the_same_items():
    card = lambda outcomes: dict(keeps_name=nc.share_of(outcomes))  # noqa: E731
    reports = dict(mid=dict(chat_eval=card([0, 0, 1, 1])), sft=dict(chat_eval=card([1, 1, 1, 0])),
                   rl=dict(chat_eval=card([1, 0])))  # rl on other items: not paired
    changes = report.chat_changes(reports)
    assert list(changes) == ["mid -> sft"]
    assert changes["mid -> sft"]["keeps_name"] == nc.paired_difference([0, 0, 1, 1], [1, 1, 1, 0])
    assert (changes["mid -> sft"]["keeps_name"]["lost"], changes["mid -> sft"]["keeps_name"]["gained"]) == (1, 2)


def test_report_shows_intervals_paired_changes_and_pass_at_k_errors():
    def card(letter, name):
        return dict(multiple_choice_letter=nc.share_of(letter), keeps_name=nc.share_of(name))

    mid = card([0] * 200, [0] * 150 + [1] * 50)
    sft = card([1] * 30 + [0] * 170, [1] * 200)
    rewards_before, rewards_after = [[0, 0], [1, 0], [0, 0]], [[1, 1], [1, 0], [0, 1]]
    history = [dict(step=0, **nc.pass_at_k_stats(rewards_before)), dict(step=5, **nc.pass_at_k_stats(rewards_after))]
    rl = dict(history=history, reward_curve=[dict(step=1, mean_reward=0.5)], steps=5, num_samples=2, pass_k=2,
              prompts_per_step=1, held_out=3, chat_eval={},
              change=dict(pass1=nc.paired_difference([0, 0.5, 0], [1, 0.5, 0.5]),
                          passk=nc.paired_difference([0, 1, 0], [1, 1, 1])))
    # as the report files hold them
    reports = json.loads(json.dumps(dict(mid=dict(chat_eval=mid), sft=dict(chat_eval=sft), rl=rl)))
    # pass@1's change: d = [1, 0, 1/2], z = 1.5 / sqrt(1.25); pass@2's: d = [1, 0, 1], z = 2 / sqrt(2)
    text = report.markdown(reports, changes=report.chat_changes(reports))
    assert "| mid | 0.0% [0.0, 1.9] (N=200) |" in text  # no "+- 0.0" at 0%
    assert "| mid | - | - | - | 25.0% +- 3.1 [19.5, 31.4] (N=200) |" in text
    assert "| sft | - | - | - | 100.0% [98.1, 100.0] (N=200) |" in text
    # mid -> sft: +15 points on letters, 30 gained; keeps_name 150 gained, McNemar z = 150 / sqrt(150)
    assert "| mid -> sft | multiple_choice_letter | +15.0 | 2.5 | +5.5 | 0 | 30 |" in text
    assert f"| mid -> sft | keeps_name | +75.0 | 3.1 | {math.sqrt(150):+.1f} | 0 | 150 |" in text
    assert "| before (step 0) | 0.167 +- 0.167 | 0.333 +- 0.333 |" in text
    assert "| after (step 5) | 0.667 +- 0.167 | 1.000 +- 0.000 |" in text
    assert ("pass@1 +0.500 +- 0.289, z +1.3 (0 lower, 2 higher); "
            "pass@2 +0.667 +- 0.333, z +1.4 (0 lower, 2 higher)") in text
