"""Stop rules: targets, plateaus, and the sweep targets turned into absolute thresholds."""

from __future__ import annotations

import pytest

from raysae.config import ConfigError, StopConfig, from_dict
from raysae.metrics import normalized_ces
from raysae.stopping import Decision, StopRule, redecide, signature, threshold_rule, transfer_rule


def test_target_stops_at_the_first_checkpoint_that_reaches_it():
    rule = StopRule("eval/ces", 0.8, "normalized CES >= 0.9")
    history = [(100, 0.5), (200, 0.79), (300, 0.8), (400, 0.95)]
    assert rule.reached(history[:2]) is None
    assert rule.reached(history[:3]) == ("target: eval/ces 0.8 >= 0.8 (normalized CES >= 0.9) "
                                         "at 300 tokens")
    assert rule.first_reached(history)[0] == 300
    assert rule.first_reached(history[:2]) is None
    assert rule.not_reached(200) == ("budget: eval/ces >= 0.8 (normalized CES >= 0.9) not "
                                     "reached in 200 tokens")


def test_plateau_needs_k_checkpoints_and_a_gain_below_the_margin():
    rule = StopRule("eval/ces", None, plateau_checkpoints=2, plateau_gain=0.01)
    # gains over two checkpoints: 0.4 (300), 0.205 (400), 0.009 (500)
    history = [(100, 0.1), (200, 0.3), (300, 0.5), (400, 0.505), (500, 0.509)]
    assert [rule.reached(history[:n]) is not None for n in range(1, 6)] == [False] * 4 + [True]
    assert rule.first_reached(history)[1].startswith("plateau: eval/ces gained 0.009 < 0.01")
    with pytest.raises(ValueError, match="neither a target nor a plateau"):
        StopRule("eval/ces")


def test_normalized_ces_target_is_the_closed_form_threshold():
    scratch, zero_shot = {"eval/ces": 0.9}, {"eval/ces": 0.4}
    rule = transfer_rule(StopConfig(normalized_ces=0.95, check_every_tokens=512), scratch, zero_shot)
    assert rule.metric == "eval/ces" and rule.every_tokens == 512
    assert rule.at_least == pytest.approx(0.875)  # 0.4 + 0.95 * (0.9 - 0.4)
    assert normalized_ces(rule.at_least, 0.4, 0.9) == pytest.approx(0.95)
    below, above = rule.at_least - 1e-9, rule.at_least + 1e-9
    assert rule.reached([(1, below)]) is None and rule.reached([(1, above)]) is not None


def test_within_scratch_and_plateau_together():
    cfg = StopConfig(within_scratch=0.02, within_metric="explained_variance", plateau_gain=0.001,
                     plateau_checkpoints=1)
    rule = transfer_rule(cfg, {"eval/explained_variance": 0.8, "eval/ces": 0.9}, {})
    assert rule.metric == "eval/explained_variance" and rule.at_least == pytest.approx(0.78)
    assert rule.reached([(1, 0.5), (2, 0.5005)]).startswith("plateau")  # plateau before target
    assert rule.reached([(1, 0.5), (2, 0.785)]).startswith("target")


def test_thresholds_stop_at_the_largest():
    rule = threshold_rule((0.7, 0.9, 0.8), 256)
    assert rule.metric == "eval/explained_variance" and rule.at_least == 0.9
    assert rule.every_tokens == 256


@pytest.mark.parametrize("section, message", [
    ({}, "sweep.stop_at: got 'no target', expected normalized_ces, within_scratch or plateau_gain"),
    ({"normalized_ces": 0.9, "within_scratch": 0.1}, "one target"),
    ({"normalized_ces": 0.0}, "sweep.stop_at.normalized_ces: got 0.0"),
    ({"plateau_gain": 0.1, "plateau_checkpoints": 0}, "plateau_checkpoints: got 0"),
    ({"normalized_ces": 0.9, "check_every_tokens": 0}, "check_every_tokens: got 0"),
])
def test_bad_stop_settings_are_named(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(StopConfig, section)


def test_a_stitch_check_interval_must_be_positive():
    from raysae.config import StitchConfig

    large = {"name": "tiny"}
    with pytest.raises(ConfigError, match=r"stitch.check_every_tokens: got -5, expected a positive count"):
        from_dict(StitchConfig, {"large": large, "num_tokens": 4096, "pairs": [[0, 1]],
                                 "stop_at_thresholds": True, "check_every_tokens": -5})
    ok = from_dict(StitchConfig, {"large": large, "num_tokens": 4096, "pairs": [[0, 1]],
                                  "stop_at_thresholds": True, "check_every_tokens": 512})
    assert ok.check_every_tokens == 512


def test_a_changed_rule_is_redecided_on_what_was_trained():
    """A training checked at 100..400 of a 1,000-token budget, stopped at 400 by its old rule:
    a lower target stops it at an earlier check, a higher one that the trained checks do not
    reach makes it train on from 400, a training that ran its budget stays at the budget, and
    no rule at all trains on to the budget."""
    history = [(100, 0.5), (200, 0.7), (300, 0.8), (400, 0.9)]
    lower = StopRule("eval/ces", 0.75, "t")
    assert redecide(lower, history, 400, 1000) == Decision(300, lower.reached(history[:3]))
    higher = StopRule("eval/ces", 0.95, "t")
    assert redecide(higher, history, 400, 1000) == Decision(400, None)
    # checks beyond what the run trained are not read (a longer, superseded training's are
    # passed as its own history)
    assert redecide(higher, [*history, (500, 0.96)], 400, 1000) == Decision(400, None)
    assert redecide(higher, [*history, (500, 0.96)], 500, 1000).tokens == 500
    full = [*history, (1000, 0.93)]
    assert redecide(higher, full, 1000, 1000) == Decision(1000, higher.not_reached(1000))
    assert redecide(None, history, 400, 1000) == Decision(400, None)
    assert redecide(None, full, 1000, 1000).reason.startswith("budget: no stop rule")


def test_a_rule_signature_ignores_only_its_wording():
    a = StopRule("eval/ces", 0.8, "normalized CES >= 0.9: zero-shot 0.4, scratch 0.9")
    assert signature(a) == signature(StopRule("eval/ces", 0.8, "other words"))
    assert signature(a) != signature(StopRule("eval/ces", 0.8, every_tokens=256))
    assert signature(a) != signature(StopRule("eval/ces", 0.81))
    assert signature(None) == "none" != signature(a)
