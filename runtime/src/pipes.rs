//! Command-line programs that write to a closed pipe (`tnc ir … | head -1`) should stop
//! quietly, as other Unix tools do. Rust starts programs with SIGPIPE ignored, so a
//! write to a closed pipe fails instead, and `println!` panics on the failure ("failed
//! printing to stdout: Broken pipe"). Each binary's `main` calls [`die_on_closed_pipe`]
//! first: the default action returns, and the process ends by the signal (the shell
//! reports status 141), without a message.

/// Restores the default action of SIGPIPE (termination). Call before any output.
pub fn die_on_closed_pipe() {
    #[cfg(unix)]
    {
        // `signal(2)` from the C library every Rust program on Unix links; declared here
        // rather than through the `libc` crate for this one call.
        unsafe extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        // SAFETY: setting a signal's disposition to the default has no preconditions; it
        // runs before any thread is started.
        unsafe {
            signal(SIGPIPE, SIG_DFL);
        }
    }
}
