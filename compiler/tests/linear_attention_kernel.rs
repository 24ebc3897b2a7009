//! The chunked-scan kernel of the linear-attention normal form, on ops built directly:
//! every direction, with and without decay, identity prologues and non-trivial ones
//! (elu, and a two-argument product), N ∈ {1, 5, 64, 65, 130} with chunks of 64 and 7,
//! through `schedule` and the reference kernel executor (f32) against the interpreter's
//! naive quadratic evaluation (f64), within 1e-4 relative L2. One schedule serves every
//! length. A timing test compiles the kernel with the LLVM CPU back end and prints its
//! time per token at N = 1024 and 4096 (flat: the scan is linear in N).

use std::collections::HashMap;
use std::ffi::c_void;
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::region::RegionNode;
use tnc_compiler::ir::{
    BinaryOp, DType, Decay, Dim, Direction, Graph, LinearAttention, Op, Region, RegionValue, TensorType, UnaryOp,
};
use tnc_compiler::schedule::{self, Schedule, ScheduleOptions};

/// `[B, H, N, w]` with symbolic B and N, two heads.
const HEADS: usize = 2;

fn ty(width: usize) -> TensorType {
    TensorType::new(
        DType::F32,
        vec![Dim::sym("B"), Dim::constant(HEADS as i64), Dim::sym("N"), Dim::constant(width as i64)],
    )
}

#[derive(Clone, Copy, Debug)]
enum Prologue {
    Identity,
    /// q' = elu(q), k' = elu(k) · g (a second operand), v' = elu(v).
    Elu,
}

fn elu(t: TensorType) -> Region {
    Region {
        args: vec![t.clone()],
        nodes: vec![RegionNode { op: Op::Unary(UnaryOp::Elu), operands: vec![RegionValue::Arg(0)], ty: t }],
        result: RegionValue::Node(0),
    }
}

fn elu_times(t: TensorType) -> Region {
    Region {
        args: vec![t.clone(), t.clone()],
        nodes: vec![
            RegionNode { op: Op::Unary(UnaryOp::Elu), operands: vec![RegionValue::Arg(0)], ty: t.clone() },
            RegionNode {
                op: Op::Binary(BinaryOp::Mul),
                operands: vec![RegionValue::Node(0), RegionValue::Arg(1)],
                ty: t,
            },
        ],
        result: RegionValue::Node(1),
    }
}

/// A graph of one linear attention over inputs; returns it with its input names.
fn graph(direction: Direction, decay: Decay, prologue: Prologue, d: usize, e: usize) -> (Graph, Vec<(String, usize)>) {
    let mut g = Graph::new("la");
    let mut names = Vec::new();
    let mut input = |g: &mut Graph, name: &str, t: TensorType, width: usize| {
        names.push((name.to_string(), width));
        g.add_input(name, t, None)
    };
    let q = input(&mut g, "q", ty(d), d);
    let k = input(&mut g, "k", ty(d), d);
    let v = input(&mut g, "v", ty(e), e);
    let (la, mut operands) = match prologue {
        Prologue::Identity => (
            LinearAttention {
                direction,
                decay,
                q: Region::identity(ty(d)),
                k: Region::identity(ty(d)),
                v: Region::identity(ty(e)),
            },
            vec![q, k, v],
        ),
        Prologue::Elu => {
            let gate = input(&mut g, "g", ty(d), d);
            (
                LinearAttention { direction, decay, q: elu(ty(d)), k: elu_times(ty(d)), v: elu(ty(e)) },
                vec![q, k, gate, v],
            )
        }
    };
    match decay {
        Decay::None => {}
        Decay::PerHead => {
            // One decay per head, broadcast over the batch.
            let lt = TensorType::new(DType::F32, vec![Dim::constant(1), Dim::constant(HEADS as i64)]);
            operands.push(input(&mut g, "lambda", lt, 0));
        }
        Decay::PerToken => {
            let at = TensorType::new(DType::F32, vec![Dim::sym("B"), Dim::constant(HEADS as i64), Dim::sym("N")]);
            operands.push(input(&mut g, "log_gate", at, 0));
        }
    }
    let out = g.add(Op::LinearAttention(Box::new(la)), &operands, None).unwrap();
    g.add_output("out", out);
    (g, names)
}

/// Deterministic values in [-1, 1).
fn noise(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn inputs(names: &[(String, usize)], b: usize, n: usize) -> Vec<(String, Tensor)> {
    names
        .iter()
        .enumerate()
        .map(|(i, (name, width))| {
            let t = if name == "lambda" {
                Tensor { shape: vec![1, HEADS], data: vec![0.9, 0.6] }
            } else if name == "log_gate" {
                // Gates from e^{-1.5} to 1, and every 23rd one 0 (log-gate −∞: floored).
                let shape = vec![b, HEADS, n];
                let len = shape.iter().product();
                let data = noise(len, 77 + n as u64)
                    .into_iter()
                    .enumerate()
                    .map(|(j, x)| if j % 23 == 22 { f64::NEG_INFINITY } else { -0.75 * (x + 1.0) })
                    .collect();
                Tensor { shape, data }
            } else {
                let shape = vec![b, HEADS, n, *width];
                let len = shape.iter().product();
                Tensor { shape, data: noise(len, (i as u64 + 1) * 1000 + n as u64) }
            };
            (name.clone(), t)
        })
        .collect()
}

fn schedule_of(g: &Graph, opts: &ScheduleOptions) -> Schedule {
    tnc_compiler::pipeline::scheduled_with(g, opts).unwrap()
}

/// The largest relative L2 error over every length.
fn check(direction: Direction, decay: Decay, prologue: Prologue, chunk: usize) -> f64 {
    let opts = ScheduleOptions { chunk, ..Default::default() };
    check_with(direction, decay, prologue, (4, 3), &opts, &[1, 5, 64, 65, 130])
}

/// [`check`] with head widths (d, e), schedule options and lengths.
fn check_with(
    direction: Direction,
    decay: Decay,
    prologue: Prologue,
    (d, e): (usize, usize),
    opts: &ScheduleOptions,
    lengths: &[usize],
) -> f64 {
    let chunk = opts.chunk;
    let (g, names) = graph(direction, decay, prologue, d, e);
    let s = schedule_of(&g, opts);
    assert_eq!(s.kernels.len(), 1, "one kernel");
    assert_eq!(s.kernels[0].threads.is_some(), opts.gpu_blocks, "a block kernel exactly on GPUs");
    let mut worst = 0f64;
    for &n in lengths {
        let b = 2;
        let ins = inputs(&names, b, n);
        let map: HashMap<String, Tensor> = ins.iter().cloned().collect();
        let want = evaluate(&g, &map, &[], &EvalOptions::default()).unwrap().outputs(&g);
        let want = &want.iter().find(|(name, _)| name == "out").unwrap().1;
        let sizes = HashMap::from([("B".to_string(), b as i64), ("N".to_string(), n as i64)]);
        let tensors: Vec<Tensor> = ins.into_iter().map(|(_, t)| t).collect();
        let got = schedule::run::run(&s, &sizes, &tensors, &[], None).unwrap();
        let mut got = got["out"].clone();
        got.shape = want.shape.clone();
        let c = compare(&got, want);
        let at = format!("{direction:?} decay={decay:?} {prologue:?} C={chunk} N={n}");
        assert!(!c.has_nan, "{at}: NaN");
        assert!(c.within(1e-4), "{at}: {c:?}");
        worst = worst.max(c.rel_l2);
    }
    worst
}

#[test]
fn chunked_kernel_matches_the_naive_interpreter() {
    for prologue in [Prologue::Identity, Prologue::Elu] {
        for (direction, decay) in [
            (Direction::Causal, Decay::None),
            (Direction::Causal, Decay::PerHead),
            (Direction::Causal, Decay::PerToken),
            (Direction::Anticausal, Decay::None),
            (Direction::Anticausal, Decay::PerHead),
            (Direction::Anticausal, Decay::PerToken),
            (Direction::Full, Decay::None),
        ] {
            for chunk in [64, 7] {
                let worst = check(direction, decay, prologue, chunk);
                eprintln!("{direction:?} decay={decay:?} {prologue:?} C={chunk}: worst relative L2 {worst:.2e}");
            }
        }
    }
}

/// The directions and decays the blocking and GPU tests cover (a full attention has no decay).
const KINDS: [(Direction, Decay); 6] = [
    (Direction::Causal, Decay::None),
    (Direction::Causal, Decay::PerHead),
    (Direction::Causal, Decay::PerToken),
    (Direction::Anticausal, Decay::PerHead),
    (Direction::Anticausal, Decay::PerToken),
    (Direction::Full, Decay::None),
];

/// Head widths that change the kernel's blocking: e = 40 takes rows 4 at a time (8 for
/// e = 3), d = 6 updates S 2 rows at a time; with chunks of 64 and 7 (rounded up to whole
/// row blocks) and lengths that end inside a row block and inside a chunk.
#[test]
fn row_blocks_of_every_width_match_the_naive_interpreter() {
    for (direction, decay) in KINDS {
        for chunk in [64, 7] {
            let opts = ScheduleOptions { chunk, ..Default::default() };
            let worst = check_with(direction, decay, Prologue::Elu, (6, 40), &opts, &[3, 66, 131]);
            eprintln!("d 6 e 40 {direction:?} decay={decay:?} C={chunk}: worst relative L2 {worst:.2e}");
        }
    }
}

/// The GPU block kernel (`schedule/linear_attention_gpu.rs`) in the GPU-semantics
/// executor: threads in random order, every shared-memory access checked for races and
/// uninitialized reads. Chunks of 64 and 4 tokens (the GPU tiles take powers of two),
/// one value tile (e = 3) and two (e = 80: tiles of 40 columns).
#[test]
fn gpu_block_kernel_matches_the_naive_interpreter() {
    for (direction, decay) in KINDS {
        for chunk in [64, 4] {
            let opts = ScheduleOptions { chunk, ..ScheduleOptions::gpu() };
            let worst = check_with(direction, decay, Prologue::Elu, (4, 3), &opts, &[1, 5, 13, 65]);
            eprintln!("GPU {direction:?} decay={decay:?} C={chunk}: worst relative L2 {worst:.2e}");
        }
        let opts = ScheduleOptions { chunk: 4, ..ScheduleOptions::gpu() };
        check_with(direction, decay, Prologue::Identity, (4, 80), &opts, &[6]);
    }
}

#[test]
fn chunk_sizes_one_and_beyond_the_sequence() {
    for chunk in [1, 200] {
        for (direction, decay) in [
            (Direction::Causal, Decay::PerHead),
            (Direction::Causal, Decay::PerToken),
            (Direction::Anticausal, Decay::PerToken),
            (Direction::Full, Decay::None),
        ] {
            check(direction, decay, Prologue::Elu, chunk);
        }
    }
}

#[test]
fn kernel_memory_is_linear_in_n() {
    // The only buffers are the inputs and the output; local arrays have constant sizes.
    let (g, _) = graph(Direction::Causal, Decay::PerToken, Prologue::Elu, 16, 16);
    let s = schedule_of(&g, &ScheduleOptions::default());
    for b in &s.buffers {
        assert!(b.bytes.degree_in("N") <= 1, "a buffer of {} bytes", b.bytes);
    }
    let text = tnc_compiler::kernel::print::to_text(&s.kernels[0]);
    assert!(!text.contains("N * N"), "{text}");
}

/// This thread's CPU time in ns (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, Linux).
#[cfg(target_os = "linux")]
fn thread_cpu_ns() -> Option<u64> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, t: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec { sec: 0, nsec: 0 };
    let ok = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    ok.then(|| t.sec as u64 * 1_000_000_000 + t.nsec as u64)
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

type KernelFn = unsafe extern "C" fn(*const *mut c_void, *const i64, i64, i64);

/// Time of the LLVM-compiled kernel (d = e = 16, causal with decay, elu prologues) at
/// N = 1024, 4096 and 16384: printed, not asserted.
#[test]
fn compiled_time_per_token_is_flat() {
    use tnc_compiler::backend::{self, CpuTarget};
    let (d, e) = (16, 16);
    let (g, names) = graph(Direction::Causal, Decay::PerHead, Prologue::Elu, d, e);
    let s = schedule_of(&g, &ScheduleOptions::default());
    let k = &s.kernels[0];
    let target = CpuTarget::parse("native").unwrap();
    let dedup = backend::dedup_kernels(&s.kernels).unwrap();
    let obj = backend::emit_object(&dedup.kernels, &target).unwrap();
    let dir = std::env::temp_dir().join(format!("tnc-la-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (o, so) = (dir.join("kernels.o"), dir.join("kernels.so"));
    std::fs::write(&o, obj).unwrap();
    backend::link_shared(&[o], &so).unwrap();
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let f: libloading::Symbol<KernelFn> = unsafe { lib.get(dedup.names[&k.name].as_bytes()) }.unwrap();
    let mut per_token = Vec::new();
    for n in [1024usize, 4096, 16384] {
        let b = 1;
        let ins = inputs(&names, b, n);
        let sizes = HashMap::from([("B".to_string(), b as i64), ("N".to_string(), n as i64)]);
        let mut args: Vec<i64> = s.sizes.iter().map(|x| sizes[x]).collect();
        args.extend([0, 0, 0]);
        // The kernel's buffers, in its order, from the schedule's bindings.
        let step = &s.steps[0];
        let mut bufs: Vec<Vec<f32>> = step
            .buffers
            .iter()
            .map(|&gb| {
                if let Some(i) = s.inputs.iter().position(|&x| x == gb) {
                    ins[i].1.data.iter().map(|&x| x as f32).collect()
                } else {
                    vec![0f32; b * HEADS * n * e]
                }
            })
            .collect();
        let ptrs: Vec<*mut c_void> = bufs.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        let extent = (b * HEADS) as i64;
        let run = || unsafe { f(ptrs.as_ptr(), args.as_ptr(), 0, extent) };
        run();
        // The fastest of a few runs, in this thread's CPU time where Linux reports it
        // (the machine is shared: wall time counts other processes' time slices).
        let secs = (0..10)
            .map(|_| {
                let (c0, t0) = (thread_cpu_ns(), std::time::Instant::now());
                run();
                match (c0, thread_cpu_ns()) {
                    (Some(a), Some(b)) => (b - a) as f64 * 1e-9,
                    _ => t0.elapsed().as_secs_f64(),
                }
            })
            .fold(f64::INFINITY, f64::min);
        let ns = secs * 1e9 / (b * HEADS * n) as f64;
        eprintln!(
            "compiled chunked linear attention, d = e = {d}, C = 64: N = {n}: {:.3} ms, {ns:.1} ns per token per head",
            secs * 1e3
        );
        per_token.push(ns);
        // The output is finite and not all zero.
        let out = &bufs[step.buffers.iter().position(|&gb| gb == s.outputs[0].1).unwrap()];
        assert!(out.iter().all(|x| x.is_finite()) && out.iter().any(|x| *x != 0.0));
    }
    eprintln!(
        "time per token relative to N = 1024: N = 4096 {:.2}, N = 16384 {:.2}",
        per_token[1] / per_token[0],
        per_token[2] / per_token[0]
    );
    drop(lib);
    let _ = std::fs::remove_dir_all(&dir);
}
