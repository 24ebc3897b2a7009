//! The `tnc` command. All logic lives in `cli/lib.rs` so tests can call it in-process.

fn main() -> std::process::ExitCode {
    tnc_runtime::pipes::die_on_closed_pipe();
    tnc::run(std::env::args_os())
}
