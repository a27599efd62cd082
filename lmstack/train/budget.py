"""A wall-clock budget (``train.max_minutes``) turned into a step count that counts everything the run does.

    budget = WallClockBudget(cfg.train, spent_before=0.0)
    ...after each optimizer step:
    new_max_steps = budget.replan(step, max_steps, elapsed)   # None: keep the current plan
    ...around each validation pass / checkpoint:
    budget.record("eval", seconds); budget.record("save", seconds)

Why a step count and not a clock check at every step: the LR schedule's decay is planned, not cut off,
and a run with ``max_minutes=0`` stays bit-for-bit reproducible.

The plan is a cost model of the rest of the run, measured on this run:

    elapsed + (N - step) * step_seconds + evals(step, N) * eval_seconds + saves(step, N) * save_seconds
            + the final validation pass, the final checkpoint and the final weights  <=  budget

``step_seconds`` is the wall time of this session minus its validation passes and checkpoints, per
step (so it includes data loading, logging and skipped batches). Until the first validation pass is
measured its cost is estimated from the step time (a forward pass is about a third of a training
step); until the first checkpoint is measured its cost is taken as that of a validation pass. A
``SAFETY`` share of the budget is kept back for noise.

When it re-plans: first after ``WARMUP_STEPS`` steps of this session, then whenever the answer moves
by more than 2%, until the run is half-way; in the second half only downwards, and only when the run
would otherwise overshoot (a machine that got slower, a first checkpoint that cost more than guessed).
A late cut shortens the LR schedule's tail a little; overshooting the budget would be worse.

Before the first plan the run is only stopped, never extended: when a step is so slow (a loaded machine)
that the next one would not fit, the run ends at once instead of finishing its ten warm-up steps.

Caveat: the first plan (after ten steps, before any validation pass or checkpoint was timed) can be
far off when those are slow; the second-half cut is what keeps such a run inside its budget.
"""

from __future__ import annotations

import math

from lmstack.config import TrainConfig

WARMUP_STEPS = 10  # steps measured before the first plan
SAFETY = 0.03  # share of the budget kept back for timing noise
FORWARD_SHARE = 1 / 3  # a validation forward pass costs about a third of a training step's forward + backward


class WallClockBudget:
    """Plans the step count of a run that must end within ``train.max_minutes`` of wall time."""

    def __init__(self, tcfg: TrainConfig, spent_before: float, start_step: int):
        self.seconds = tcfg.max_minutes * 60
        self.step_cap = tcfg.max_steps
        self.eval_every, self.ckpt_every = tcfg.eval_every, tcfg.ckpt_every
        self.eval_batches, self.grad_accum = tcfg.eval_batches, tcfg.grad_accum
        self.spent_before = spent_before  # wall seconds of earlier sessions of this run (resume)
        self.start_step = start_step
        self.eval_seconds: float | None = None  # the latest measured validation pass
        self.save_seconds: float | None = None  # the latest measured checkpoint
        self.other_seconds = 0.0  # this session's time in validation passes and checkpoints

    def record(self, kind: str, seconds: float) -> None:
        """A validation pass (``kind="eval"``) or a checkpoint (``"save"``) just took ``seconds``."""
        if kind == "eval":
            self.eval_seconds = seconds
        elif kind == "save":
            self.save_seconds = seconds
        else:
            raise ValueError(f"unknown budget record {kind!r}; use 'eval' or 'save'")
        self.other_seconds += seconds

    def step_seconds(self, step: int, session_seconds: float) -> float:
        """Wall seconds per optimizer step in this session, validation passes and checkpoints left out."""
        return max(session_seconds - self.other_seconds, 1e-6) / max(step - self.start_step, 1)

    def replan(self, step: int, max_steps: int, session_seconds: float) -> int | None:
        """The new total step count after ``step`` steps, or None to keep ``max_steps``."""
        done_here = step - self.start_step
        if done_here < WARMUP_STEPS:
            # too few steps to plan the schedule from, but a machine so slow that the budget runs out
            # before the first plan must not run past it waiting for one
            return step if self._out_of_time(step, session_seconds) else None
        planned = self._plan(step, session_seconds)
        if step <= max_steps // 2:
            first = done_here == WARMUP_STEPS
            return planned if first or abs(planned - max_steps) > max(1, 0.02 * max_steps) else None
        return planned if planned < max_steps else None

    def _out_of_time(self, step: int, session_seconds: float) -> bool:
        """Another step would end past the budget, counting only what was measured (before the first plan
        the validation and checkpoint costs are guesses from too few steps to stop a run on)."""
        measured_final = (self.eval_seconds or 0.0) + 2 * (self.save_seconds or 0.0)
        left = self.seconds * (1 - SAFETY) - self.spent_before - session_seconds - measured_final
        return left < self.step_seconds(step, session_seconds)

    def _plan(self, step: int, session_seconds: float) -> int:
        per_step = self.step_seconds(step, session_seconds)
        eval_cost = self.eval_seconds if self.eval_seconds is not None else \
            self.eval_batches * per_step * FORWARD_SHARE / self.grad_accum
        save_cost = self.save_seconds if self.save_seconds is not None else eval_cost
        # on average each step also carries its share of the periodic validation passes and checkpoints
        per_step_all_in = per_step + (eval_cost / self.eval_every if self.eval_every else 0.0) + \
            (save_cost / self.ckpt_every if self.ckpt_every else 0.0)
        final = eval_cost + 2 * save_cost  # the last validation pass, the last checkpoint, RUN/model
        left = self.seconds * (1 - SAFETY) - self.spent_before - session_seconds - final
        affordable = math.floor(left / per_step_all_in) if left > 0 else 0
        return max(step + 1, min(self.step_cap, step + affordable))
