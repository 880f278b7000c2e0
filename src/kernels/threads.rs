//! Intra-op threads: an opt-in pool that splits one kernel call (a large
//! matrix multiply, the AdamW update) into pieces run on several cores.
//!
//! Off by default: [`set_threads`]`(1)` is the single-threaded model every
//! test and benchmark describes. With `n > 1`, `n − 1` helper threads are
//! started once; each spins for a short while after its last piece (waking a
//! parked thread costs tens of microseconds on a virtual machine, more than a
//! small piece takes) and then parks. The caller works on the call too, so a
//! call never hands off work it could do at once, and a call never allocates.
//!
//! Pieces are claimed, not dealt: every thread takes the next piece as soon
//! as it is free, so a core slowed by a neighbour (on a VM, the host's other
//! tenants) takes fewer pieces instead of making the others wait for it.
//! A piece is a disjoint part of the output computed by the same arithmetic
//! in the same order as the single-threaded call, so results are
//! bit-identical for any thread count and whichever thread takes which piece.

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

/// Runs `f` on every item of `pieces`, each thread (the caller included)
/// claiming the next item whenever it is free. Runs them all on the caller,
/// in order, when threads are off, the pool is already busy (another caller,
/// or a nested call) or there is at most one piece.
pub(super) fn for_each_claimed<I>(pieces: I, f: &(dyn Fn(I::Item) + Sync))
where
    I: Iterator + Send,
{
    let most = pieces.size_hint().1.unwrap_or(usize::MAX);
    let helpers = threads().min(most).saturating_sub(1);
    let pool = POOL.get().filter(|_| helpers > 0);
    let guard = pool.and_then(|p| match p.busy.try_lock() {
        Ok(guard) => Some(guard),
        // A piece that panicked unwound through an earlier call holding the
        // lock; the lock guards no data, so the pool is as good as before.
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    });
    let (Some(pool), Some(_guard)) = (pool, guard) else {
        pieces.for_each(f);
        return;
    };
    if pool.helpers() < helpers {
        pieces.for_each(f);
        return;
    }
    let queue = Mutex::new(pieces);
    // The lock is held only to take an item, never while `f` runs; a
    // poisoned queue (a panic inside `next`) ends every thread's loop.
    let claim = || queue.lock().ok().and_then(|mut q| q.next());
    let drain = |_thread: usize| {
        while let Some(piece) = claim() {
            f(piece);
        }
    };
    let job = Job { run: &drain };
    pool.start(&job, helpers);
    // Even if the caller's piece panics, the helpers must be done with `job`
    // before this frame (which owns it) unwinds.
    let outcome = catch_unwind(AssertUnwindSafe(|| drain(0)));
    pool.wait();
    if let Err(panic) = outcome {
        resume_unwind(panic);
    }
}

/// One call being run: thread i runs `run(i)`.
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
    /// Helpers still working on the current call.
    pending: AtomicUsize,
    /// Set when a piece panicked on a helper.
    panicked: AtomicBool,
}

/// One helper's mailbox.
struct Worker {
    /// The [`Job`] it should take part in (on the caller's stack), or null.
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

    /// Waits until every helper is done with the current call.
    fn wait(&self) {
        while self.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a kernel piece panicked on a helper thread");
        }
    }

    /// A helper's life: wait for a job in its mailbox, run it as thread
    /// `index`, report, repeat.
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

    /// Pieces run on the helper in a call of `pieces` pieces whose caller
    /// holds on to the first piece it takes until the helper has run all the
    /// others — or a second has passed: the pool was busy with another
    /// test's call and this one ran serially (then retried, up to 20 times).
    fn taken_by_the_helper_while_the_caller_is_held_up(pieces: usize) -> usize {
        set_threads(2);
        let mut by_helper = 0;
        for _ in 0..20 {
            let (on_helper, caller_waited) = (AtomicUsize::new(0), AtomicBool::new(false));
            for_each_claimed(0..pieces, &|_| {
                if thread::current().name() == Some("moe-kernel-1") {
                    on_helper.fetch_add(1, Ordering::Relaxed);
                } else if !caller_waited.swap(true, Ordering::Relaxed) {
                    let since = Instant::now();
                    while on_helper.load(Ordering::Relaxed) < pieces - 1
                        && since.elapsed() < Duration::from_secs(1)
                    {
                        std::hint::spin_loop();
                    }
                }
            });
            by_helper = on_helper.into_inner();
            if by_helper == pieces - 1 {
                break;
            }
        }
        by_helper
    }

    #[test]
    fn every_piece_runs_once_and_a_panic_in_any_piece_reaches_the_caller() {
        set_threads(2);
        let runs: [AtomicUsize; 5] = std::array::from_fn(|_| AtomicUsize::new(0));
        for _ in 0..100 {
            for_each_claimed(0..5, &|i| {
                runs[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(runs.map(|r| r.into_inner()), [100; 5]);
        for bad in [0, 1] {
            let outcome = catch_unwind(|| {
                for_each_claimed(0..2, &|i| assert_ne!(i, bad, "piece {bad} fails"));
            });
            assert!(outcome.is_err(), "a panic in piece {bad} was lost");
        }
        // The pool still works after both panics, and still in parallel.
        assert_eq!(
            taken_by_the_helper_while_the_caller_is_held_up(2),
            1,
            "after a panic every call ran serially"
        );
    }

    #[test]
    fn a_thread_held_up_in_one_piece_leaves_the_rest_to_the_others() {
        assert_eq!(
            taken_by_the_helper_while_the_caller_is_held_up(16),
            15,
            "the helper never took the pieces the caller left"
        );
    }
}
