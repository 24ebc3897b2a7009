//! tnc-train: the pure-Rust pieces of a training run that do not depend on the compiled
//! model — where batches come from, how state is checkpointed and resumed, how metrics
//! are logged and plotted, and the learning-rate schedule.
//!
//! Everything here is deterministic given its inputs (data is a pure function of seed
//! and position; no global generators), so a run resumed from a checkpoint continues
//! exactly as the uninterrupted run would have.

pub mod checkpoint;
pub mod data;
pub mod flags;
pub mod interrupt;
mod labelled;
mod listops;
pub mod lr;
pub mod metrics;
pub mod plot;
pub mod sampling;
mod tasks;
mod text;
pub mod text_codec;
pub mod token_file;
pub mod tokenizer;
pub mod trainer;

pub use checkpoint::{latest_valid, Checkpoint};
pub use data::{Batch, DataSource};
pub use lr::{lr, Schedule};
pub use metrics::MetricsLog;
pub use plot::{loss_plot, Series};
pub use trainer::{Config, EvalReport, StepReport, Trainer};
