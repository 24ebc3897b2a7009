//! The CPU runtime's library GEMMs, one thread, on shapes of the benchmark T1's training
//! step (`--set dim=256 glu_dim=683`, B 2 N 1024: 2,048 tokens) and a square 1024³: f32
//! with the `gemm` crate, and bf16 operands on every native kernel this CPU has
//! (`TNC_BF16_GEMM`, see `bf16_gemm.rs`) and widened to f32. Throughput is in elements of
//! C·k, so criterion's "elem/s" × 2 is FLOP/s.
//!
//! Group `peak`: this core's f32 FMA peak, a loop of independent fused multiply-adds on
//! registers only (AVX-512 where the CPU has it, else AVX2), the figure the library GEMMs
//! and the training step are stated as fractions of (`benches/README.md`); elements are
//! FLOPs here.
//!
//!     cargo bench -p tnc-runtime --bench gemm -- --warm-up-time 1 --measurement-time 3

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tnc_runtime::bf16_gemm::Kernel;
use tnc_runtime::gemm::{run, Operands, Shape, View};

/// (name, m, n, k, A transposed, B transposed): a projection, the GLU's up and down
/// products, a weight gradient (Aᵀ·B over the tokens), the logits of one vocabulary
/// chunk, and of the whole vocabulary against a tied embedding table (B = Eᵀ, read with
/// the table's rows as its columns, as the cross-entropy's product does).
const SHAPES: [(&str, i64, i64, i64, bool, bool); 7] = [
    ("proj 2048x256x256", 2048, 256, 256, false, false),
    ("glu_up 2048x683x256", 2048, 683, 256, false, false),
    ("glu_down 2048x256x683", 2048, 256, 683, false, false),
    ("weight_grad 256x683x2048", 256, 683, 2048, true, false),
    ("logits 2048x1024x256", 2048, 1024, 256, false, false),
    ("tied_logits 2048x4096x256", 2048, 4096, 256, false, true),
    ("square 1024", 1024, 1024, 1024, false, false),
];

fn shape(m: i64, n: i64, k: i64, a_transposed: bool, b_transposed: bool) -> Shape {
    let a = if a_transposed { View { offset: 0, rows: 1, cols: m } } else { View { offset: 0, rows: k, cols: 1 } };
    Shape {
        batch: Vec::new(),
        m,
        n,
        k,
        a,
        b: if b_transposed { View { offset: 0, rows: 1, cols: k } } else { View { offset: 0, rows: n, cols: 1 } },
        c: View { offset: 0, rows: n, cols: 1 },
        accumulate: false,
    }
}

fn gemms(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    for (name, m, n, k, at, bt) in SHAPES {
        let s = shape(m, n, k, at, bt);
        group.throughput(Throughput::Elements((m * n * k) as u64));
        let a32: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) / 9.0).collect();
        let b32: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
        let bits = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect() };
        let (a16, b16) = (bits(&a32), bits(&b32));
        let mut out = vec![0f32; (m * n) as usize];
        group.bench_function(BenchmarkId::new("f32", name), |bench| {
            // SAFETY: dense buffers of exactly the shape's sizes.
            bench.iter(|| unsafe {
                run(&s, Operands::F32, a32.as_ptr() as _, b32.as_ptr() as _, out.as_mut_ptr(), 0, m)
            })
        });
        let label = match Kernel::detect() {
            Some(k) => format!("bf16 {}", k.name()),
            None => "bf16 widened".to_string(),
        };
        group.bench_function(BenchmarkId::new(label, name), |bench| {
            // SAFETY: as above, in bf16 elements for A and B.
            bench.iter(|| unsafe {
                run(&s, Operands::BF16, a16.as_ptr() as _, b16.as_ptr() as _, out.as_mut_ptr(), 0, m)
            })
        });
    }
    group.finish();
}

/// Rounds of the FMA loops, and their independent accumulator chains: 12 chains hide
/// the FMA latency (4 cycles, 2 issued a cycle: 8 in flight) on every x86 core we run on.
const FMA_ROUNDS: usize = 1 << 16;
const FMA_CHAINS: usize = 12;

/// `FMA_ROUNDS` rounds of one FMA on each of `FMA_CHAINS` accumulators, on registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn fma_chains<V: Copy>(zero: V, x: V, y: V, fma: impl Fn(V, V, V) -> V) -> [V; FMA_CHAINS] {
    let mut acc = [zero; FMA_CHAINS];
    for _ in 0..FMA_ROUNDS {
        for a in acc.iter_mut() {
            *a = fma(*a, x, y);
        }
    }
    acc
}

/// # Safety
/// AVX-512 F is present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512() -> f32 {
    use std::arch::x86_64::*;
    let acc = fma_chains(_mm512_setzero_ps(), _mm512_set1_ps(1.0 - 1e-7), _mm512_set1_ps(1e-7), |a, x, y| {
        _mm512_fmadd_ps(a, x, y)
    });
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

/// # Safety
/// AVX2 and FMA are present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2() -> f32 {
    use std::arch::x86_64::*;
    let acc = fma_chains(_mm256_setzero_ps(), _mm256_set1_ps(1.0 - 1e-7), _mm256_set1_ps(1e-7), |a, x, y| {
        _mm256_fmadd_ps(a, x, y)
    });
    let mut lanes = [0f32; 8];
    acc.iter()
        .map(|&v| {
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            lanes.iter().sum::<f32>()
        })
        .sum()
}

fn peak(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut group = c.benchmark_group("peak");
        let runs: [(&str, usize, bool, unsafe fn() -> f32); 2] = [
            ("f32 FMA avx512, one core", 16, is_x86_feature_detected!("avx512f"), fma_loop_avx512),
            (
                "f32 FMA avx2, one core",
                8,
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                fma_loop_avx2,
            ),
        ];
        for (name, lanes, available, run) in runs {
            if !available {
                continue;
            }
            group.throughput(Throughput::Elements((2 * lanes * FMA_ROUNDS * FMA_CHAINS) as u64));
            // SAFETY: the loop's instructions are present (checked above).
            group.bench_function(name, |bench| bench.iter(|| std::hint::black_box(unsafe { run() })));
        }
        group.finish();
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

criterion_group!(benches, gemms, peak);
criterion_main!(benches);
