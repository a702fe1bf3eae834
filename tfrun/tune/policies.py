"""Early-termination policies of a tuning study: which running trial to stop, from the
per-epoch values of the objective every trial records.

``median``, ``bandit`` and ``truncation`` are the cloud tuners' policies, under their names
and with their arguments (``evaluation_interval`` and ``delay_evaluation`` in epochs); they
are decided here from the curves alone, so they work with any sampler (grid and random
included). ``asha`` and ``hyperband`` are Optuna's SuccessiveHalvingPruner and
HyperbandPruner, which the study asks through ``trial.should_prune()``.

A trial is evaluated after ``delay_evaluation + k * evaluation_interval`` epochs (k >= 1),
against the other trials of the study (running, finished or pruned) that recorded that
epoch; until one has, there is nothing to compare with and it runs on.

A value that is not a finite number (NaN, or infinite: a diverged trial) is no result: every
policy stops the trial at the first such epoch, whatever its schedule (it does not come
back), the study tells it as failed, and no comparison uses it (a NaN peer would make every
comparison false, and stop the pruning of everyone). Optuna is told finite values only.
"""

from __future__ import annotations

import inspect
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from tfrun.config.validate import is_number, is_whole
from tfrun.errors import ConfigError

Curve = Mapping[int, float]  # epoch count (1-based: after n epochs) -> objective value

_COMMON = {"evaluation_interval": 1, "delay_evaluation": 0}
# Each policy decided here: its arguments and their defaults.
OWN: dict[str, dict[str, Any]] = {
    "median": {**_COMMON},
    "bandit": {**_COMMON, "slack_factor": None, "slack_amount": None},
    "truncation": {**_COMMON, "truncation_percentage": 10},
}
OPTUNA = {"asha": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner"}
POLICIES = ("none", *OWN, *OPTUNA)


@dataclass(frozen=True)
class Policy:
    """A policy chosen and checked: its name and its arguments (defaults filled in)."""

    name: str = "none"
    args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """``bandit slack_factor=0.1 evaluation_interval=1 delay_evaluation=0``."""
        shown = " ".join(f"{k}={v}" for k, v in sorted(self.args.items()) if v is not None)
        return f"{self.name} {shown}".strip()


def _optuna_arguments(name: str) -> list[str]:
    import optuna

    cls = getattr(optuna.pruners, OPTUNA[name])
    return [p for p in inspect.signature(cls).parameters if p != "self"]


def make(name: str, args: Mapping[str, Any] | None, objective: str | None) -> Policy:
    """Check a policy and its arguments; errors name the key, the value and what is allowed."""
    args = dict(args or {})
    if name not in POLICIES:
        raise ConfigError.invalid("hydra.sweeper.policy", name, POLICIES)
    if name == "none":
        if args:
            raise ConfigError(
                f"hydra.sweeper.policy_args={args} but hydra.sweeper.policy=none: choose a policy "
                f"({', '.join(POLICIES[1:])}) or drop the arguments"
            )
        return Policy()
    if not objective:
        raise ConfigError(
            f"hydra.sweeper.policy={name} stops trials from the objective's values per epoch, but no "
            f"objective is set: add tfrun.objective=METRIC (a Keras metric such as val_accuracy, or "
            f"a value the script records with tfrun.log_metric)"
        )
    allowed = list(OWN[name]) if name in OWN else _optuna_arguments(name)
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(
            f"hydra.sweeper.policy_args.{unknown[0]}={args[unknown[0]]!r} is not an argument of "
            f"policy {name}: it takes {', '.join(allowed)}"
        )
    if name in OWN:
        args = {**OWN[name], **args}
        _check_own(name, args)
    else:
        _check_optuna(name, args)
    return Policy(name, args)


# Optuna's pruners check their arguments late or not at all (Hyperband builds its brackets when the
# first trial asks, so a bad reduction_factor would fail mid-study): check them here, before anything runs.
_OPTUNA_WHOLE = {
    "min_resource": 1,
    "max_resource": 1,
    "reduction_factor": 2,
    "min_early_stopping_rate": 0,
    "bootstrap_count": 0,
}
_OPTUNA_AUTO = {("asha", "min_resource"), ("hyperband", "max_resource")}


def _check_optuna(name: str, args: dict[str, Any]) -> None:
    for key, value in args.items():
        least = _OPTUNA_WHOLE.get(key)
        auto = (name, key) in _OPTUNA_AUTO
        if least is not None and not is_whole(value, least) and not (auto and value == "auto"):
            raise ConfigError.invalid(
                f"hydra.sweeper.policy_args.{key}",
                value,
                f"a whole number, {least} or more{' (epochs)' if 'resource' in key else ''}"
                f"{', or auto' if auto else ''}",
            )
    low, high = args.get("min_resource", 1), args.get("max_resource", "auto")
    if name == "hyperband" and is_whole(low, 1) and is_whole(high, 1) and high < low:
        raise ConfigError(
            f"hydra.sweeper.policy_args.max_resource={high} is below min_resource={low}: Hyperband "
            f"judges trials between the two (in epochs)"
        )


def _check_own(name: str, args: dict[str, Any]) -> None:
    for key in ("evaluation_interval", "delay_evaluation"):
        if not is_whole(args[key], 1 if key == "evaluation_interval" else 0):
            raise ConfigError(
                f"hydra.sweeper.policy_args.{key}={args[key]!r}: an integer number of epochs, "
                f"{'at least 1' if key == 'evaluation_interval' else '0 or more'}"
            )
    for key in ("slack_factor", "slack_amount"):
        if args.get(key) is not None and not (is_number(args[key]) and args[key] >= 0):
            raise ConfigError.invalid(f"hydra.sweeper.policy_args.{key}", args[key], "a number, 0 or more")
    if name == "bandit" and (args["slack_factor"] is None) == (args["slack_amount"] is None):
        raise ConfigError(
            f"policy bandit takes one of hydra.sweeper.policy_args.slack_factor (a ratio, e.g. 0.1) "
            f"or slack_amount (in the metric's units), got slack_factor={args['slack_factor']} "
            f"slack_amount={args['slack_amount']}"
        )
    percentage = args.get("truncation_percentage")
    if name == "truncation" and not (is_number(percentage) and 1 <= percentage <= 99):
        raise ConfigError(
            f"hydra.sweeper.policy_args.truncation_percentage={percentage!r}: a percentage between 1 and 99"
        )


def optuna_pruner(policy: Policy) -> Any:
    """The Optuna pruner the study is created with (a no-op one unless asha/hyperband)."""
    import optuna

    if policy.name in OPTUNA:
        return getattr(optuna.pruners, OPTUNA[policy.name])(**policy.args)
    return optuna.pruners.NopPruner()


def evaluation_point(policy: Policy, epochs_done: int) -> int | None:
    """The latest epoch count at which ``policy`` evaluates a trial that has ``epochs_done``."""
    interval, delay = policy.args["evaluation_interval"], policy.args["delay_evaluation"]
    if epochs_done < delay + interval:
        return None
    return delay + (epochs_done - delay) // interval * interval


def _worse(value: float, than: float, maximize: bool) -> bool:
    return value < than if maximize else value > than


class OptunaTrial(Protocol):
    """What the policies use of an ``optuna.trial.Trial``."""

    def report(self, value: float, step: int) -> None:
        """Record the value after ``step`` epochs."""

    def should_prune(self) -> bool:
        """Does the study's pruner stop the trial now?"""


def diverged(curve: Curve) -> tuple[int, str] | None:
    """(epoch count, why) of the first value that is NaN or infinite, else None."""
    for epoch in sorted(curve):
        if not math.isfinite(curve[epoch]):
            return epoch, f"its value after {epoch} epoch(s) is {curve[epoch]}, not a finite number"
    return None


def finite(curve: Curve, upto: int) -> bool:
    """Are the curve's values up to epoch ``upto`` finite numbers (a trial to compare with there)?"""
    return all(math.isfinite(v) for e, v in curve.items() if e <= upto)


def report(trial: OptunaTrial, curve: Curve, reported: set[int]) -> None:
    """Tell Optuna the values of the epochs not told yet (``reported``, updated), up to the
    first that is not a finite number: such a trial is stopped instead (:func:`decide`), and
    Optuna never told it, so its pruners compare finite numbers only."""
    for epoch in sorted(set(curve) - reported):
        if not math.isfinite(curve[epoch]):
            return
        trial.report(curve[epoch], epoch)
        reported.add(epoch)


def judge(
    policy: Policy, maximize: bool, curve: Curve, peers: Sequence[Curve], trial: OptunaTrial, reported: set[int]
) -> tuple[int, str] | None:
    """The study's look at a running trial: (epoch count, why) if ``policy`` stops it, else
    None. Its epochs not told yet (``reported``) are told to Optuna; ``asha`` and ``hyperband``
    are asked after each one, as in Optuna's own loop: successive halving records a rung's
    value at the step it is asked, so epochs told together would be judged by the last one
    (a trial seen late would look better than its peers at their rungs)."""
    stopped = decide(policy, maximize, curve, peers)
    if policy.name not in OPTUNA or stopped is not None:
        report(trial, curve, reported)
        return stopped
    for epoch in sorted(set(curve) - reported):
        trial.report(curve[epoch], epoch)
        reported.add(epoch)
        if trial.should_prune():
            return epoch, f"Optuna's {OPTUNA[policy.name]}"
    return None


def decide(policy: Policy, maximize: bool, curve: Curve, peers: Sequence[Curve]) -> tuple[int, str] | None:
    """(epoch count, why) if ``policy`` stops the trial whose values are ``curve``, from the
    curves alone; else None. For ``asha`` and ``hyperband`` only a diverged trial: Optuna
    decides the rest (:func:`judge`)."""
    if policy.name == "none" or not curve:
        return None
    stopped = diverged(curve)
    if stopped is not None or policy.name in OPTUNA:
        return stopped
    return _own(policy, maximize, curve, peers)


def _own(policy: Policy, maximize: bool, curve: Curve, peers: Sequence[Curve]) -> tuple[int, str] | None:
    """median, bandit and truncation, from the curves (all of them finite up to where they compare)."""
    at = evaluation_point(policy, max(curve))
    if at is None or at not in curve:
        return None
    others = [p for p in peers if at in p and finite(p, at)]
    if not others:
        return None
    value = curve[at]
    if policy.name == "bandit":
        return _bandit(policy.args, maximize, at, value, [p[at] for p in others])
    if policy.name == "median":
        mine = statistics.fmean(curve[e] for e in range(1, at + 1) if e in curve)
        middle = statistics.median(statistics.fmean(p[e] for e in range(1, at + 1) if e in p) for p in others)
        if _worse(mine, middle, maximize):
            return (
                at,
                f"running average {mine:.4g} after {at} epoch(s) is worse than the median {middle:.4g} of {len(others)} other trial(s)",
            )
        return None
    values = [p[at] for p in others]
    count = len(values) + 1
    cut = int(float(policy.args["truncation_percentage"]) * count / 100)
    better = sum(1 for v in values if _worse(value, v, maximize))
    if cut >= 1 and better >= count - cut:
        return at, (
            f"{value:.4g} after {at} epoch(s) is in the lowest {policy.args['truncation_percentage']}% of "
            f"{count} trial(s)"
        )
    return None


def bandit_bound(args: Mapping[str, Any], maximize: bool, best: float) -> float:
    """The worst value bandit lets run on, given the best at that epoch. The slack is the
    amount, or the factor's share of the best's size (``|best|``): best/(1+f) and best*(1+f)
    for a positive best, the same distance on the other side of zero for a negative one,
    always towards the worse values (so the best is never outside its own slack)."""
    if args.get("slack_amount") is not None:
        slack = float(args["slack_amount"])
    else:
        factor = float(args["slack_factor"])
        slack = abs(best) * (factor / (1 + factor) if maximize else factor)
    return best - slack if maximize else best + slack


def _bandit(
    args: Mapping[str, Any], maximize: bool, at: int, value: float, values: list[float]
) -> tuple[int, str] | None:
    best = max(values) if maximize else min(values)
    bound = bandit_bound(args, maximize, best)
    if _worse(value, bound, maximize):
        return at, f"{value:.4g} after {at} epoch(s) is outside the slack of the best {best:.4g} (bound {bound:.4g})"
    return None
