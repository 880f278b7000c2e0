//! Training for a wall-clock budget instead of a step count (`moe train
//! --time`): when to stop, and how long to make the warm-up + cosine schedule
//! so that the learning rate reaches its floor as the time runs out.
//!
//! The run's *training clock* counts the seconds of its training loop —
//! steps, evaluations and saves — summed over every session of the run
//! (a resumed run continues it); the start-up (tokenizer, loading) is not on
//! it. The schedule's length is re-estimated before every step from the step
//! rate measured so far in the session: the steps that still fit in the time
//! left, after keeping a reserve for what follows the last step (its
//! evaluation and save). The last step is the one after which no other fits,
//! so it ends the schedule: its learning rate is the floor. When a stall uses
//! the time up before the step the schedule expected to end on, the run takes
//! one more step, planned as the last (at the floor): the learning rate
//! always ends at its floor, at the cost of at most one step over the budget.
//!
//! Nothing here reads a clock: every function takes the clock readings it
//! needs, so the logic is tested with made-up times.

/// The budget of a timed run and the pace measured in this session.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeBudget {
    /// Seconds of training clock the whole run may use.
    budget: f64,
    /// The session's first reading (step, clock) and its latest: the rate
    /// is measured between them, so the session's first step — which pays
    /// for warming caches and threads — is not counted.
    first: Option<(u64, f64)>,
    latest: Option<(u64, f64)>,
}

/// What to do next in a timed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Take another step, with a schedule `total_steps` long.
    Step {
        /// The schedule length to use for it (its last step included).
        total_steps: u64,
    },
    /// No further step fits in the budget: evaluate, save and stop.
    Stop,
}

impl TimeBudget {
    /// A budget of `seconds` of training clock, with no pace measured yet.
    pub fn new(seconds: f64) -> Self {
        TimeBudget {
            budget: seconds,
            first: None,
            latest: None,
        }
    }

    /// The budget in seconds.
    pub fn seconds(&self) -> f64 {
        self.budget
    }

    /// Records that `step` steps were complete when the training clock read
    /// `clock` seconds (call after each step).
    pub fn record(&mut self, step: u64, clock: f64) {
        self.first.get_or_insert((step, clock));
        self.latest = Some((step, clock));
    }

    /// Seconds per step measured so far this session — evaluations and saves
    /// in between included, so they are paid for in the estimate — or None
    /// before two readings.
    pub fn seconds_per_step(&self) -> Option<f64> {
        let ((s0, c0), (s1, c1)) = (self.first?, self.latest?);
        (s1 > s0).then(|| (c1 - c0).max(0.0) / (s1 - s0) as f64)
    }

    /// What to do after `step` steps with the clock at `clock`, keeping
    /// `reserve` seconds for the final evaluation and save: stop when the
    /// next step would not end in time (at the rate measured; before there
    /// is one, only once the time left is gone), else step with the schedule
    /// ending at the last step that fits — `unknown` (the length so far)
    /// while the rate is not known.
    pub fn plan(&self, step: u64, clock: f64, reserve: f64, unknown: u64) -> Plan {
        let left = self.budget - reserve.max(0.0) - clock;
        let fits = match self.seconds_per_step() {
            Some(per) if per > 0.0 => (left / per).floor(),
            // No rate yet (or an unmeasurably fast one): go on while any time is left.
            _ if left > 0.0 => {
                return Plan::Step {
                    total_steps: unknown.max(step + 1),
                };
            }
            _ => 0.0,
        };
        if fits < 1.0 {
            Plan::Stop
        } else {
            Plan::Step {
                total_steps: step.saturating_add(fits.min(1e15) as u64),
            }
        }
    }

    /// The schedule length for the step after `step` (clock at `clock`): the
    /// plan's, or — when no step fits any more (evaluations or saves overran,
    /// or a stall) — that step itself, so the step taken ends the schedule.
    pub fn schedule_for_next(&self, step: u64, clock: f64, reserve: f64, current: u64) -> u64 {
        match self.plan(step, clock, reserve, current) {
            Plan::Step { total_steps } => total_steps,
            Plan::Stop => step.saturating_add(1),
        }
    }

    /// True when the run ends after `step` (clock at `clock`, schedule
    /// `total_steps` long): no further step fits and the schedule has ended.
    /// When the time ran out before the schedule did, the run goes on for
    /// one step, which [`TimeBudget::schedule_for_next`] makes the last.
    pub fn ends_after(&self, step: u64, clock: f64, reserve: f64, total_steps: u64) -> bool {
        step >= total_steps && self.plan(step, clock, reserve, total_steps) == Plan::Stop
    }
}

/// Seconds to keep after the last step for its evaluation and save: the
/// last ones measured, or, before an evaluation was timed, `eval_batches`
/// evaluation forwards on the training set and as many on the validation
/// set at a third of a step each (a forward is about a third of the step's
/// forward + backward + update).
pub fn reserve(
    last_eval: Option<f64>,
    last_save: Option<f64>,
    eval_batches: usize,
    seconds_per_step: Option<f64>,
) -> f64 {
    let eval = last_eval
        .unwrap_or_else(|| 2.0 * eval_batches as f64 / 3.0 * seconds_per_step.unwrap_or(0.0));
    eval + last_save.unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainConfig;
    use crate::optim::learning_rate;

    /// A simulated timed run from `step` with the clock at `clock`: each step
    /// takes `pace(step)` seconds, every `eval_every`-th is followed by an
    /// evaluation of `eval` seconds. Returns (step, clock after it,
    /// learning rate) of every step taken, and the schedule lengths used.
    fn simulate(
        budget: &mut TimeBudget,
        config: &mut TrainConfig,
        (mut step, mut clock): (u64, f64),
        pace: impl Fn(u64) -> f64,
        (eval_every, eval): (u64, f64),
    ) -> (Vec<(u64, f64, f64)>, Vec<u64>) {
        let (mut taken, mut lengths) = (Vec::new(), Vec::new());
        let mut last_eval = None;
        loop {
            let reserve = reserve(last_eval, None, 8, budget.seconds_per_step());
            config.total_steps = budget.schedule_for_next(step, clock, reserve, config.total_steps);
            lengths.push(config.total_steps);
            step += 1;
            let lr = learning_rate(config, step);
            clock += pace(step);
            budget.record(step, clock);
            let last = budget.ends_after(step, clock, reserve, config.total_steps);
            if step % eval_every == 0 || last {
                clock += eval;
                last_eval = Some(eval);
            }
            taken.push((step, clock, lr));
            assert!(taken.len() < 1_000_000, "never stopped");
            if last {
                return (taken, lengths);
            }
        }
    }

    fn config(warmup: u64) -> TrainConfig {
        TrainConfig {
            warmup_steps: warmup,
            total_steps: warmup,
            ..TrainConfig::default()
        }
    }

    fn floor(config: &TrainConfig) -> f64 {
        config.min_lr_ratio * config.lr
    }

    #[test]
    fn at_a_steady_pace_the_schedule_ends_at_the_floor_as_the_time_runs_out() {
        let mut budget = TimeBudget::new(60.0);
        let mut config = config(100);
        let (steps, lengths) = simulate(&mut budget, &mut config, (0, 0.0), |_| 0.01, (100, 0.05));
        let &(last, clock, lr) = steps.last().unwrap();
        assert!(clock <= 60.0, "over the budget: {clock}");
        // 60 s at 10 ms a step, less 59 evaluations of 50 ms: about 5700 steps.
        assert!((5650..=5710).contains(&last), "{last} steps");
        assert!(60.0 - clock < 0.06, "{clock}: time left unused");
        assert!((lr - floor(&config)).abs() < 1e-12, "last lr {lr}");
        // The schedule's length settles and moves by about 1 % only.
        let settled = &lengths[1000..];
        let (lo, hi) = (settled.iter().min().unwrap(), settled.iter().max().unwrap());
        assert!(hi - lo <= 60, "{lo}..{hi}");
        // After the warm-up the rate falls, but for the estimate's jitter
        // (an evaluation makes the measured pace a little slower at once,
        // the steps after it a little faster again).
        let after: Vec<f64> = steps[100..].iter().map(|s| s.2).collect();
        let rise = after.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        assert!(rise < 0.01 * config.lr, "rises by {rise}");
        assert!(after[0] > 0.99 * config.lr);
    }

    #[test]
    fn a_pace_that_halves_midway_still_ends_at_the_floor_within_the_budget() {
        let mut budget = TimeBudget::new(30.0);
        let mut config = config(50);
        let (steps, lengths) = simulate(
            &mut budget,
            &mut config,
            (0, 0.0),
            |step| if step < 1000 { 0.01 } else { 0.02 },
            (100, 0.05),
        );
        let &(last, clock, lr) = steps.last().unwrap();
        assert!(clock <= 30.0 && 30.0 - clock < 0.1, "{clock}");
        assert!((lr - floor(&config)).abs() < 1e-12, "last lr {lr}");
        // Re-estimated: first expecting ~2800 steps, then fewer.
        assert!(lengths[900] > 2500, "{}", lengths[900]);
        assert_eq!(*lengths.last().unwrap(), last);
        assert!(last < 2200, "{last}");
    }

    #[test]
    fn a_resumed_session_keeps_the_schedule_until_it_has_a_pace_then_ends_at_the_floor() {
        let mut config = config(20);
        let mut first = TimeBudget::new(10.0);
        // The first session is stopped after 4 s (at its step 400).
        let mut at = (0, 0.0);
        loop {
            let reserve = reserve(None, None, 8, first.seconds_per_step());
            let Plan::Step { total_steps } = first.plan(at.0, at.1, reserve, config.total_steps)
            else {
                panic!("stopped early")
            };
            config.total_steps = total_steps;
            at = (at.0 + 1, at.1 + 0.01);
            first.record(at.0, at.1);
            if at.0 == 400 {
                break;
            }
        }
        let saved = config.total_steps;
        assert!((950..=1000).contains(&saved), "{saved}");
        let mut second = TimeBudget::new(10.0);
        // Before its first step the new session has no pace: the saved
        // length stands.
        assert_eq!(
            second.plan(400, 4.0, 0.0, saved),
            Plan::Step { total_steps: saved }
        );
        let (steps, _) = simulate(&mut second, &mut config, at, |_| 0.005, (1000, 0.0));
        let &(last, clock, lr) = steps.last().unwrap();
        assert!(clock <= 10.0 && 10.0 - clock < 0.02, "{clock}");
        assert!((1550..=1600).contains(&last), "{last}");
        assert!((lr - floor(&config)).abs() < 1e-12, "last lr {lr}");
    }

    #[test]
    fn a_stall_before_the_expected_last_step_still_ends_the_schedule_at_the_floor() {
        // Steady 10 ms steps, but the step the schedule expected to be its
        // second-to-last takes 200 ms: the time runs out one step early.
        let mut probe = TimeBudget::new(20.0);
        let mut config = config(50);
        let (steady, _) = simulate(&mut probe, &mut config, (0, 0.0), |_| 0.01, (100, 0.0));
        let stall_at = steady.last().unwrap().0 - 1;
        let mut budget = TimeBudget::new(20.0);
        let mut config = self::config(50);
        let pace = |step| if step == stall_at { 0.2 } else { 0.01 };
        let (steps, lengths) = simulate(&mut budget, &mut config, (0, 0.0), pace, (100, 0.0));
        let &(last, clock, lr) = steps.last().unwrap();
        assert!((lr - floor(&config)).abs() < 1e-12, "last lr {lr}");
        assert_eq!(*lengths.last().unwrap(), last);
        // The stalled step used the time up; the run took one more (10 ms).
        let (before, clock_before, lr_before) = steps[steps.len() - 2];
        assert_eq!(before, stall_at);
        assert!(clock_before > 20.0 && (clock - clock_before - 0.01).abs() < 1e-9);
        // Without it the run would have ended above the floor, one step short.
        let expected = lengths[lengths.len() - 2];
        assert!(
            before < expected && lr_before > floor(&config),
            "{before} of {expected}"
        );
    }

    #[test]
    fn a_spent_budget_stops_at_once_and_a_reserve_is_kept() {
        let mut budget = TimeBudget::new(5.0);
        assert_eq!(budget.plan(7, 5.0, 0.0, 10), Plan::Stop);
        assert_eq!(budget.plan(7, 4.0, 1.5, 10), Plan::Stop);
        assert_eq!(budget.plan(7, 4.0, 0.5, 10), Plan::Step { total_steps: 10 });
        budget.record(8, 1.0);
        budget.record(10, 2.0);
        assert_eq!(budget.seconds_per_step(), Some(0.5));
        // 3 s left less 1 s reserved: 4 steps of 0.5 s.
        assert_eq!(
            budget.plan(10, 2.0, 1.0, 99),
            Plan::Step { total_steps: 14 }
        );
        assert_eq!(budget.plan(13, 3.6, 1.0, 99), Plan::Stop);
        assert_eq!(reserve(Some(2.0), Some(0.5), 8, Some(1.0)), 2.5);
        assert!((reserve(None, None, 6, Some(0.3)) - 1.2).abs() < 1e-12);
    }
}
