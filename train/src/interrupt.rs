//! Ctrl-C (SIGINT) and SIGTERM during training: the first asks the loop to stop after the
//! step it is in — it then writes a checkpoint, says where, and exits with status 130 —
//! and a second one exits at once (the checkpoints already written are intact: each is
//! written to a temporary file and renamed). Without this a signal killed the run at once
//! and lost every step since the last checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The exit status of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_STATUS: u8 = 130;

/// Installs the handler for SIGINT and SIGTERM (once per process; again is harmless).
pub fn install() {
    #[cfg(unix)]
    {
        // From the C library every Rust program on Unix links (no `libc` crate for two
        // calls). glibc's `signal` keeps the handler installed and restarts interrupted
        // system calls.
        unsafe extern "C" {
            fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
            fn _exit(status: i32) -> !;
        }
        extern "C" fn on_signal(_: i32) {
            // Only async-signal-safe work here: an atomic swap, and `_exit`.
            if REQUESTED.swap(true, Ordering::SeqCst) {
                // SAFETY: `_exit` is async-signal-safe and ends the process.
                unsafe { _exit(i32::from(EXIT_STATUS)) }
            }
        }
        const SIGINT: i32 = 2;
        const SIGTERM: i32 = 15;
        // SAFETY: `on_signal` is async-signal-safe (see above).
        unsafe {
            signal(SIGINT, on_signal);
            signal(SIGTERM, on_signal);
        }
    }
}

/// Whether a stop was asked for since the process started.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
