//! The tnc runtime. It must never depend on LLVM or on the compiler crate: it loads
//! what the compiler wrote and runs it. For now it holds the pieces that compiled code,
//! the runtime and the reference interpreter must share bit for bit: the counter-based
//! random generator behind dropout and parameter initialization.

pub mod rng;
