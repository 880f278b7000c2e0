//! Intra-op threads: an opt-in pool that splits one kernel call (a large
//! matrix multiply, the AdamW update) into parts run on several cores.
//!
//! Off by default: [`set_threads`]`(1)` is the single-threaded model every
//! test and benchmark describes. With `n > 1`, `n − 1` helper threads are
//! started once; each spins for a short while after its last part (waking a
//! parked thread costs tens of microseconds on a virtual machine, more than a
//! small part takes) and then parks. The caller runs part 0 itself, so a call
//! never hands off work it could do at once, and a call never allocates.
//!
//! Parts are disjoint pieces of the output computed by the same arithmetic in
//! the same order as the single-threaded call, so results are bit-identical
//! for any thread count.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// Most threads one call is split over.
pub const MAX_THREADS: usize = 8;

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// Threads a call may use (1 = run everything on the caller).
static THREADS: AtomicUsize = AtomicUsize::new(1);

/// Sets how many threads (the caller included, at most [`MAX_THREADS`]) one
/// large kernel call may use, starting the helpers on first use. Returns the
/// count in effect.
pub fn set_threads(n: usize) -> usize {
    let n = n.clamp(1, MAX_THREADS);
    if n > 1 {
        pool().grow(n - 1);
    }
    THREADS.store(n, Ordering::Relaxed);
    n
}

/// Threads a call may use now.
pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// Runs `f` on every `Some` of `parts`, part 0 on the caller and part i on
/// helper i. Falls back to running them one after another when the pool is
/// off, already busy (another caller, or a nested call) or too small.
pub(super) fn run_parts<T: Send>(parts: [Option<T>; MAX_THREADS], f: &(dyn Fn(T) + Sync)) {
    let used = parts.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
    let pool = POOL.get();
    let guard = pool.and_then(|p| match p.busy.try_lock() {
        Ok(guard) => Some(guard),
        // A part that panicked unwound through an earlier call holding the
        // lock; the lock guards no data, so the pool is as good as before.
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    });
    let (Some(pool), Some(_guard)) = (pool, guard) else {
        parts.into_iter().flatten().for_each(f);
        return;
    };
    if used <= 1 || pool.helpers() < used - 1 {
        parts.into_iter().flatten().for_each(f);
        return;
    }
    let slots = parts.map(Mutex::new);
    let run_slot = |i: usize| {
        let part = slots[i].lock().ok().and_then(|mut slot| slot.take());
        if let Some(part) = part {
            f(part);
        }
    };
    let job = Job { run: &run_slot };
    pool.start(&job, used - 1);
    // Even if part 0 panics, the helpers must be done with `job` before this
    // frame (which owns it) unwinds.
    let outcome = catch_unwind(AssertUnwindSafe(|| run_slot(0)));
    pool.wait();
    if let Err(panic) = outcome {
        resume_unwind(panic);
    }
}

/// One call being run: `run(i)` for every part i.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
}

/// The helpers and the hand-off between them and the caller.
struct Pool {
    /// Held by the caller for the duration of a call (a helper's own nested
    /// call finds it taken and runs serially).
    busy: Mutex<()>,
    /// Helpers started so far.
    started: AtomicUsize,
    /// Helper i's mailbox is `workers[i − 1]`.
    workers: [Worker; MAX_THREADS - 1],
    /// Helpers still running a part of the current call.
    pending: AtomicUsize,
    /// Set when a part panicked on a helper.
    panicked: AtomicBool,
}

/// One helper's mailbox.
struct Worker {
    /// The [`Job`] it should run a part of (on the caller's stack), or null.
    job: AtomicPtr<()>,
    /// True while it is parked (or about to park).
    parked: AtomicBool,
    /// Its thread, to unpark it.
    thread: OnceLock<Thread>,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool {
        busy: Mutex::new(()),
        started: AtomicUsize::new(0),
        workers: std::array::from_fn(|_| Worker {
            job: AtomicPtr::new(std::ptr::null_mut()),
            parked: AtomicBool::new(false),
            thread: OnceLock::new(),
        }),
        pending: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    })
}

impl Pool {
    fn helpers(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }

    /// Starts helpers until there are at least `n`.
    fn grow(&'static self, n: usize) {
        let _busy = self.busy.lock();
        for index in self.helpers() + 1..=n {
            let handle = thread::Builder::new()
                .name(format!("moe-kernel-{index}"))
                .spawn(move || self.helper(index))
                .expect("spawning a kernel thread");
            let _ = self.workers[index - 1].thread.set(handle.thread().clone());
            self.started.store(index, Ordering::Release);
        }
    }

    /// Hands `job` to helpers 1..=helpers.
    fn start(&self, job: &Job<'_>, helpers: usize) {
        self.pending.store(helpers, Ordering::Relaxed);
        let job = job as *const Job<'_> as *mut ();
        for w in &self.workers[..helpers] {
            w.job.store(job, Ordering::SeqCst);
            if w.parked.swap(false, Ordering::SeqCst)
                && let Some(thread) = w.thread.get()
            {
                thread.unpark();
            }
        }
    }

    /// Waits until every helper has finished its part of the current call.
    fn wait(&self) {
        while self.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a kernel part panicked on a helper thread");
        }
    }

    /// A helper's life: wait for a job in its mailbox, run part `index`,
    /// report, repeat.
    fn helper(&self, index: usize) {
        let mailbox = &self.workers[index - 1];
        loop {
            let idle_since = Instant::now();
            let mut spins = 0u32;
            let job = loop {
                let job = mailbox.job.load(Ordering::Acquire);
                if !job.is_null() {
                    break job as *const Job<'_>;
                }
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(1024) || idle_since.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                mailbox.parked.store(true, Ordering::SeqCst);
                if mailbox.job.load(Ordering::SeqCst).is_null() {
                    thread::park();
                }
                mailbox.parked.store(false, Ordering::SeqCst);
            };
            // SAFETY: the caller put `job` in this mailbox (the Acquire load
            // above sees the Job it points to) and does not return — so the
            // Job and everything it borrows stay alive — until `pending`
            // drops to zero, which happens only after this use.
            let run = unsafe { (*job).run };
            if catch_unwind(AssertUnwindSafe(|| run(index))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            mailbox.job.store(std::ptr::null_mut(), Ordering::Relaxed);
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_parts() -> [Option<usize>; MAX_THREADS] {
        let mut parts: [Option<usize>; MAX_THREADS] = Default::default();
        parts[0] = Some(0);
        parts[1] = Some(1);
        parts
    }

    #[test]
    fn every_part_runs_once_and_a_panic_in_any_part_reaches_the_caller() {
        set_threads(2);
        let runs: [AtomicUsize; MAX_THREADS] = std::array::from_fn(|_| AtomicUsize::new(0));
        for _ in 0..100 {
            run_parts(two_parts(), &|i| {
                runs[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        let runs = runs.map(|r| r.into_inner());
        assert_eq!(&runs[..3], &[100, 100, 0]);
        for bad in [0, 1] {
            let outcome = catch_unwind(|| {
                run_parts(two_parts(), &|i| assert_ne!(i, bad, "part {bad} fails"));
            });
            assert!(outcome.is_err(), "a panic in part {bad} was lost");
        }
        // The pool still works after both panics, and still in parallel:
        // part 1 runs on helper 1 (retried, as another test's kernel call may
        // hold the pool at that moment and make this one serial).
        let on_helper = AtomicBool::new(false);
        for _ in 0..1000 {
            let sum = AtomicUsize::new(0);
            run_parts(two_parts(), &|i| {
                sum.fetch_add(i + 1, Ordering::Relaxed);
                if i == 1 && thread::current().name() == Some("moe-kernel-1") {
                    on_helper.store(true, Ordering::Relaxed);
                }
            });
            assert_eq!(sum.into_inner(), 3);
            if on_helper.load(Ordering::Relaxed) {
                break;
            }
        }
        assert!(
            on_helper.into_inner(),
            "after a panic every call ran serially"
        );
    }
}
