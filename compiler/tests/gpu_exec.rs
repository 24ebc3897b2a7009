//! The GPU-semantics executor (`kernel/gpu_exec.rs`) on a hand-built block kernel: a row
//! sum by one block of 32 threads per row, with a shared array and a tree reduction. It
//! computes the sums, and each way of breaking it is reported: the missing barriers as a
//! race, an unwritten shared element, a barrier not every thread reaches.

mod common;
use common::kernels::*;
use tnc_compiler::kernel::exec::{run_all, Buffer};

const ROWS: usize = 5;

fn x() -> Vec<f32> {
    (0..ROWS * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0).collect()
}

fn run(bug: BlockBug) -> Result<Vec<f32>, String> {
    let k = block_row_sum(bug);
    let mut buffers = vec![Buffer::F32(x()), Buffer::F32(vec![f32::NAN; ROWS])];
    run_all(&k, &mut buffers, &[ROWS as i64])?;
    let Buffer::F32(out) = &buffers[1] else { unreachable!() };
    Ok(out.clone())
}

#[test]
fn a_block_reduction_computes_row_sums() {
    let out = run(BlockBug::None).unwrap();
    let x = x();
    for (r, got) in out.iter().enumerate() {
        let want: f64 = x[r * 64..(r + 1) * 64].iter().map(|&v| v as f64).sum();
        assert!((*got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "row {r}: {got} vs {want}");
    }
}

#[test]
fn a_missing_barrier_is_reported_as_a_race() {
    let e = run(BlockBug::NoBarriers).unwrap_err();
    assert!(e.contains("race") && e.contains("no barrier between") && e.contains("block 0"), "{e}");
}

#[test]
fn reading_unwritten_shared_memory_is_reported() {
    let e = run(BlockBug::ReadsUnwritten).unwrap_err();
    assert!(e.contains("no thread has written") && e.contains("uninitialized"), "{e}");
}

#[test]
fn a_barrier_not_every_thread_reaches_is_reported() {
    let e = run(BlockBug::DivergentBarrier).unwrap_err();
    assert!(e.contains("barrier") && e.contains("differs between threads"), "{e}");
}
