//! The kernel passes of every CPU back end: reductions over a column loop interchanged
//! (`kernel/interchange.rs`), the remaining serial reductions dealt to vector lanes
//! (`kernel/lanes.rs`), vector loops over merged axes split into contiguous runs
//! (`kernel/split_vector.rs`). Each is exact; each makes loops LLVM's vectorizer could
//! not widen into loops it can, and an interchanged reduction walks memory in order
//! whether or not its loop is vectorized.

use super::contract::KernelPass;
use crate::kernel::{interchange, lanes, split_vector, Kernel};
use crate::schedule::Schedule;

pub fn cpu_kernel_passes() -> Vec<KernelPass> {
    vec![
        KernelPass { name: "interchange", run: |s| each_kernel(s, interchange::interchange_reductions) },
        KernelPass { name: "lanes", run: |s| each_kernel(s, lanes::deal_reductions) },
        KernelPass { name: "split_vector", run: |s| each_kernel(s, split_vector::split_vector_loops) },
    ]
}

fn each_kernel(s: &mut Schedule, f: fn(&Kernel) -> Kernel) {
    s.kernels = s.kernels.iter().map(f).collect();
}
