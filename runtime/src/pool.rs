//! The CPU executor's worker threads, started once and kept for the executor's life.
//!
//! Spawning threads for every entry point costs more than the thread creation itself:
//! each new thread starts with empty thread-local state, so the GEMM library allocates
//! (and the kernel zero-fills, page by page) its packing buffers again on every step.
//! [`Pool::run`] runs a job on every thread, the caller's included, and returns when all
//! have finished it, so a job may borrow from the caller's stack, as with scoped threads.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A job: called with the thread's number, `0..threads`.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// What the threads share: the current job (lifetime erased, see `run`), its number,
/// how many threads are still on it, and the first panic.
struct State {
    job: Option<Job<'static>>,
    generation: u64,
    running: usize,
    panic: Option<Box<dyn std::any::Any + Send>>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Workers wait here for a new generation.
    start: Condvar,
    /// `run` waits here for `running` to reach 0.
    done: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool of `threads` threads in all: the caller of [`Pool::run`] and `threads − 1`
    /// workers.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { job: None, generation: 0, running: 0, panic: None, stop: false }),
            start: Condvar::new(),
            done: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|t| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tnc-worker-{t}"))
                    .spawn(move || work(&shared, t))
                    .expect("spawning a worker thread")
            })
            .collect();
        Pool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(t)` for every thread `t` (0 on the calling thread) and returns when all
    /// have returned; a panic in any of them is resumed here.
    pub fn run(&self, job: Job<'_>) {
        if self.workers.is_empty() {
            return job(0);
        }
        // SAFETY: the job is only called until `running` reaches 0, which this function
        // waits for before returning (also when the caller's own part panics), so the
        // erased lifetime never outlives the borrow.
        let erased: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            s.job = Some(erased);
            s.generation += 1;
            s.running = self.workers.len();
        }
        self.shared.start.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.running > 0 {
            s = self.shared.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.job = None;
        let theirs = s.panic.take();
        drop(s);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

fn work(shared: &Shared, t: usize) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while s.generation == seen && !s.stop {
                s = shared.start.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.stop {
                return;
            }
            seen = s.generation;
            s.job.expect("a new generation has a job")
        };
        let result = catch_unwind(AssertUnwindSafe(|| job(t)));
        let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(p) = result {
            s.panic.get_or_insert(p);
        }
        s.running -= 1;
        if s.running == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.shared.start.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_thread_runs_every_job_and_borrows_are_honoured() {
        let pool = Pool::new(3);
        for round in 0..100usize {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|t| {
                hits[t].fetch_add(round + 1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == round + 1));
        }
    }

    #[test]
    fn a_panic_in_a_worker_reaches_the_caller_and_the_pool_still_works() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.run(&|t| assert!(t != 1, "worker 1"))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
