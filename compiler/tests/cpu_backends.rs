//! The CPU back ends (LLVM and Cranelift) against the kernel IR's reference executor:
//! hand-built kernels are compiled for `native`, x86-64-v3 and (where the host runs it)
//! x86-64-v4 by each code generator, linked into a shared object, loaded, run over
//! sub-ranges, and compared element by element with `kernel::exec::run` on the same
//! inputs (bit for bit, except where a test states a tolerance).

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use tnc_compiler::backend::{self, CodeGen, CpuTarget, Target};
use tnc_compiler::kernel::exec::{self, Buffer};
use tnc_compiler::kernel::*;

mod common;
use common::kernels::*;

// ---- test data ----

fn data(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| (tnc_bundle::rng::normal(seed, 1, i as u64, 0) * 3.0) as f32).collect()
}

// ---- compiling, loading, comparing ----

static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Lib {
    lib: libloading::Library,
    dir: PathBuf,
}

impl Drop for Lib {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type KernelFn = unsafe extern "C" fn(*const *mut c_void, *const i64, i64, i64);

/// A CPU target and the code generator writing it.
struct Gen {
    target: CpuTarget,
    codegen: CodeGen,
    /// e.g. `x86-64-v3 (cranelift)`, for messages.
    name: String,
}

impl Gen {
    fn new(target: &str, codegen: CodeGen) -> Gen {
        let target = CpuTarget::parse(target).unwrap();
        let name = format!("{} ({})", target.name, codegen.name());
        Gen { target, codegen, name }
    }

    /// The bundle's `kernels.so` for `kernels`, as the back end writes it, or its error.
    fn shared_object(&self, kernels: &[Kernel]) -> Result<Vec<u8>, String> {
        let backend = backend::backend_for(&Target::Cpu(self.target.clone()), self.codegen)?;
        let written = backend.write(kernels, backend::Emit::default())?;
        Ok(written.file("kernels.so").expect("a CPU bundle has kernels.so").to_vec())
    }
}

fn compile(kernels: &[Kernel], gen: &Gen) -> Lib {
    let so_bytes = gen.shared_object(kernels).unwrap_or_else(|e| panic!("{}: {e}", gen.name));
    let dir = std::env::temp_dir().join(format!(
        "tnc-cpu-backends-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let so = dir.join("kernels.so");
    std::fs::write(&so, so_bytes).unwrap();
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    Lib { lib, dir }
}

/// What to run on this host: native, x86-64-v3 and x86-64-v4 where supported, each
/// written by LLVM and by Cranelift.
fn targets() -> Vec<Gen> {
    let mut run = Vec::new();
    for codegen in CodeGen::ALL {
        for name in ["native", "x86-64-v3", "x86-64-v4"] {
            let gen = Gen::new(name, codegen);
            if gen.target.host_supports() {
                run.push(gen);
            }
        }
    }
    assert!(run.iter().filter(|g| g.target.name == "native").count() == 2, "native must run on its host");
    run
}

/// Prefill for output buffers: the generated code's copy gets NaN (or another marker) and
/// the executor's a different marker, so an element only one of them writes fails.
fn prefill(b: &Buffer, native: bool) -> Buffer {
    match b {
        Buffer::F32(v) => Buffer::F32(vec![if native { f32::NAN } else { -7777.0 }; v.len()]),
        Buffer::BF16(v) => Buffer::BF16(vec![if native { 0x7fc1 } else { 0x7fc2 }; v.len()]),
        Buffer::F16(v) => Buffer::F16(vec![if native { 0x7e01 } else { 0x7e02 }; v.len()]),
        Buffer::I32(v) => Buffer::I32(vec![if native { i32::MIN } else { i32::MIN + 1 }; v.len()]),
        Buffer::U8(v) => Buffer::U8(vec![if native { 0xAA } else { 0xBB }; v.len()]),
    }
}

/// Run `k` from `lib` over 0..split then split..n, the executor over 0..n, and compare.
/// `tol` is the largest relative error allowed for f32 results (0: bitwise equal).
fn check(lib: &Lib, target: &str, k: &Kernel, inputs: &[Buffer], sizes: &[i64], n: i64, tol: f32) {
    let mut expect: Vec<Buffer> = inputs
        .iter()
        .zip(&k.buffers)
        .map(|(b, d)| if d.access == Access::Write { prefill(b, false) } else { b.clone() })
        .collect();
    let mut got: Vec<Buffer> = inputs
        .iter()
        .zip(&k.buffers)
        .map(|(b, d)| if d.access == Access::Write { prefill(b, true) } else { b.clone() })
        .collect();
    exec::run(k, &mut expect, sizes, 0, n).unwrap();
    let f: libloading::Symbol<KernelFn> = unsafe { lib.lib.get(k.name.as_bytes()) }.unwrap();
    let ptrs: Vec<*mut c_void> = got.iter_mut().map(Buffer::as_mut_ptr).collect();
    for (b, e) in [(0, n / 3), (n / 3, n / 3), (n / 3, n)] {
        unsafe { f(ptrs.as_ptr(), sizes.as_ptr(), b, e) };
    }
    for (bi, (g, e)) in got.iter().zip(&expect).enumerate() {
        let name = &k.buffers[bi].name;
        match (g, e) {
            (Buffer::F32(g), Buffer::F32(e)) => {
                for (j, (&a, &b)) in g.iter().zip(e).enumerate() {
                    let ok = if a.is_nan() || b.is_nan() {
                        a.is_nan() && b.is_nan()
                    } else if tol == 0.0 || a.is_infinite() || b.is_infinite() {
                        a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0)
                    } else {
                        (a - b).abs() <= tol * b.abs().max(1e-30)
                    };
                    assert!(ok, "{target}: kernel `{}` {name}[{j}]: generated {a:e}, executor {b:e}", k.name);
                }
            }
            (g, e) => assert_eq!(g, e, "{target}: kernel `{}` buffer {name}", k.name),
        }
    }
}

// ---- tests ----

/// A kernel, its inputs and sizes, how many iterations to run, and the tolerance.
struct Case {
    kernel: Kernel,
    inputs: Vec<Buffer>,
    sizes: Vec<i64>,
    n: i64,
    tol: f32,
}

impl Case {
    fn new(kernel: Kernel, inputs: Vec<Buffer>, sizes: &[i64], n: i64, tol: f32) -> Case {
        Case { kernel, inputs, sizes: sizes.to_vec(), n, tol }
    }

    fn check(&self, lib: &Lib, target: &str) {
        check(lib, target, &self.kernel, &self.inputs, &self.sizes, self.n, self.tol);
    }

    /// The same computation with the kernel's body inside a vector loop: iteration `r`
    /// runs the old body for index `r·chunk + l`, `l` in `0..min(chunk, n − r·chunk)`
    /// (`n` an extra scalar argument), so that every operation of the corpus runs in
    /// vector loops with a remainder. With `constant`, the loop's extent is the constant
    /// `chunk` and the index `min(r·chunk + l, n − 1)` (the last chunk's extra lanes
    /// redo element `n − 1` with the same values), so that only the parts of the loop a
    /// constant extent needs are written.
    fn in_vector_loops(self, chunk: i64, constant: bool) -> Case {
        let k = &self.kernel;
        let (r, l) = (k.next_var(), k.next_var() + 1);
        let count = size(k.sizes.len() + k.scalars.len());
        let start = mul(var(r), i(chunk));
        let index = add(start.clone(), var(l));
        let (index, extent) = if constant {
            (bin(Binary::Min, index, bin(Binary::Sub, count.clone(), i(1))), i(chunk))
        } else {
            (index, bin(Binary::Min, i(chunk), bin(Binary::Sub, count.clone(), start)))
        };
        let mut body = vec![Stmt::Let { var: k.index, value: index }];
        body.extend(k.body.iter().cloned());
        let kernel = Kernel {
            name: format!("{}_in_vector_loops", k.name),
            scalars: k.scalars.iter().cloned().chain(["count".to_string()]).collect(),
            index: v(r),
            extent: bin(Binary::Div, add(count, i(chunk - 1)), i(chunk)),
            body: vec![for_(l, extent, LoopKind::Vector, body)],
            ..k.clone()
        };
        let sizes = self.sizes.iter().copied().chain([self.n]).collect();
        Case { kernel, sizes, n: (self.n + chunk - 1) / chunk, ..self }
    }
}

/// The corpus with inputs: special values included, loops with remainders.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // broadcast: B=3, N=5, D=37 (a vector loop with a remainder).
    let (b, n, d) = (3usize, 5usize, 37usize);
    let inputs = vec![
        Buffer::F32(data(b * n * d, 1)),
        Buffer::F32(data(d, 2)),
        Buffer::F32(data(n, 3)),
        Buffer::F32(vec![0.0; b * n * d]),
    ];
    cases.push(Case::new(broadcast_kernel(), inputs, &[b as i64, n as i64, d as i64], (b * n) as i64, 0.0));

    // math, with special values among the inputs.
    let mut x = data(203, 4);
    x[..8].copy_from_slice(&[0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, 88.0, -100.0]);
    let n = x.len();
    let inputs = vec![Buffer::F32(x), Buffer::F32(vec![0.0; n * MATH_ROWS])];
    cases.push(Case::new(math_kernel(), inputs, &[n as i64], n as i64, 1e-5));

    // reduce: 19 rows of 101.
    let (r, c) = (19usize, 101usize);
    let mut x = data(r * c, 5);
    x[3 * c + 7] = f32::NAN;
    let inputs = vec![Buffer::F32(x), Buffer::F32(vec![0.0; r]), Buffer::F32(vec![0.0; r])];
    cases.push(Case::new(reduce_kernel(), inputs, &[r as i64, c as i64], r as i64, 0.0));

    // branch
    let r = 41usize;
    let inputs = vec![
        Buffer::F32(data(r * 4, 6)),
        Buffer::F32(data(r * 4, 7)),
        Buffer::I32(vec![0; r]),
        Buffer::U8(vec![0; r]),
        Buffer::F32(vec![0.0; r]),
    ];
    cases.push(Case::new(branch_kernel(), inputs, &[r as i64], r as i64, 0.0));

    // casts
    let mut a: Vec<i32> = (0..64).map(|j| (j * 7919 - 200_000) * if j % 3 == 0 { 1000 } else { 1 }).collect();
    a[..4].copy_from_slice(&[i32::MIN, i32::MAX, 0, -1]);
    let mut x = data(64, 8).into_iter().map(|v| v * 1e3).collect::<Vec<_>>();
    x[..6].copy_from_slice(&[f32::NAN, 3e9, -3e9, f32::INFINITY, -0.0, 1e19]);
    let m: Vec<u8> = (0..64).map(|j| (j % 3 == 1) as u8).collect();
    let inputs = vec![
        Buffer::I32(a),
        Buffer::F32(x),
        Buffer::U8(m),
        Buffer::I32(vec![0; 64 * CAST_INTS]),
        Buffer::F32(vec![0.0; 64 * CAST_FLOATS]),
        Buffer::U8(vec![0; 64 * CAST_BOOLS]),
    ];
    cases.push(Case::new(cast_kernel(), inputs, &[64], 64, 0.0));

    // arrays
    let r = 23usize;
    let inputs = vec![Buffer::F32(data(r * 8, 9)), Buffer::F32(vec![0.0; r]), Buffer::F32(vec![0.0; r])];
    cases.push(Case::new(array_kernel(), inputs, &[r as i64], r as i64, 0.0));

    // dropout: seed with the high bit set, a step beyond 2^32.
    let n = 1000usize;
    let inputs = vec![Buffer::F32(data(n, 10)), Buffer::F32(vec![0.0; n]), Buffer::U8(vec![0; 4 * n])];
    let sizes = [n as i64, 0xDEAD_BEEF_1234_5678u64 as i64, (1i64 << 32) + 17];
    cases.push(Case::new(dropout_kernel(), inputs, &sizes, n as i64, 0.0));
    cases
}

fn check_all(cases: &[Case], gens: &[Gen]) {
    let kernels: Vec<Kernel> = cases.iter().map(|c| c.kernel.clone()).collect();
    for gen in gens {
        let lib = compile(&kernels, gen);
        for case in cases {
            case.check(&lib, &gen.name);
        }
    }
}

#[test]
fn kernels_match_the_executor() {
    check_all(&cases(), &targets());
}

/// A Cranelift target with SSE4.2 and no FMA: vector loops stay scalar (`vector.rs`
/// needs fused multiply-adds on vectors).
fn without_fma() -> Gen {
    let features = ["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"];
    let target = CpuTarget {
        name: "sse4.2-only".into(),
        triple: "x86_64-unknown-linux-gnu".into(),
        cpu: "x86-64-v2".into(),
        features: features.iter().map(|f| format!("+{f}")).collect::<Vec<_>>().join(","),
        required_features: features.iter().map(|f| f.to_string()).collect(),
    };
    Gen { name: "sse4.2-only (cranelift)".into(), target, codegen: CodeGen::Cranelift }
}

/// Every kernel of the corpus with its body in vector loops of 11 (a pair of four-lane
/// steps of Cranelift's SIMD and three left over): bit for bit the executor's, on every
/// target and back end, and on Cranelift's scalar fallback.
#[test]
fn vector_loops_match_the_executor() {
    let all = cases().into_iter().chain([sixteen_bit_case()]);
    let cases: Vec<Case> = all.map(|c| c.in_vector_loops(11, false)).collect();
    let mut gens = targets();
    gens.push(without_fma());
    check_all(&cases, &gens);
}

/// Vector loops of constant extent, which Cranelift writes with only the parts that run:
/// 3 (the scalar remainder alone), 4 (one four-lane step), 8 (one pair of steps), 13 (a
/// pair, a step and a remainder). Bit for bit the executor's on every target.
#[test]
fn constant_vector_loops_match_the_executor() {
    for chunk in [3, 4, 8, 13] {
        let all = cases().into_iter().chain([sixteen_bit_case()]);
        let cases: Vec<Case> = all.map(|c| c.in_vector_loops(chunk, true)).collect();
        check_all(&cases, &targets());
    }
}

/// Cranelift writes a vector loop in packed SIMD instructions where the target has FMA
/// and SSE4.1, and one element at a time without.
#[test]
fn cranelift_vector_loops_are_simd_where_the_target_allows() {
    let asm = |gen: &Gen| {
        let backend = backend::backend_for(&Target::Cpu(gen.target.clone()), gen.codegen).unwrap();
        let written = backend.write(&[broadcast_kernel()], backend::Emit { llvm: false, asm: true }).unwrap();
        String::from_utf8(written.extras.iter().find(|(ext, _)| *ext == "s").unwrap().1.clone()).unwrap()
    };
    let packed = |s: &str| ["mulps", "addps"].iter().filter(|op| s.contains(*op)).count();
    let v3 = asm(&Gen::new("x86-64-v3", CodeGen::Cranelift));
    assert_eq!(packed(&v3), 2, "x86-64-v3 should multiply and add four lanes at a time:\n{v3}");
    let sse = asm(&without_fma());
    assert_eq!(packed(&sse), 0, "without FMA the loop should stay scalar:\n{sse}");
    assert!(sse.contains("mulss") && sse.contains("addss"), "{sse}");
}

/// A vector loop whose bindings the same in every iteration run once before it (a load
/// before the first store, arithmetic), and one that reads what the body stores does not:
/// `c = mark[r]` after `mark[r] = s + 1` must see the store, lane by lane as in order.
#[test]
fn vector_loop_invariants_are_hoisted_only_where_that_is_safe() {
    let (r, l, a, s, e, c, d) = (0, 1, 2, 3, 4, 5, 6);
    let body = vec![
        let_(a, ld(0, var(r))),
        let_(s, mul(var(a), f(2.0))),
        let_(e, add(mul(var(r), size(1)), var(l))),
        store(2, var(e), add(mul(ld(1, var(e)), var(s)), var(a))),
        store(3, var(r), add(var(s), f(1.0))),
        let_(c, ld(3, var(r))),
        let_(d, mul(var(c), f(3.0))),
        store(4, var(e), add(var(d), ld(1, var(e)))),
    ];
    let k = kernel(
        "invariants",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("y", Elem::F32, Access::Read),
            buf("out", Elem::F32, Access::Write),
            buf("mark", Elem::F32, Access::ReadWrite),
            buf("out2", Elem::F32, Access::Write),
        ],
        &["R", "K"],
        &[],
        size(0),
        vec![for_(l, size(1), LoopKind::Vector, body)],
    );
    let (rows, width) = (7usize, 19usize);
    let inputs = vec![
        Buffer::F32(data(rows, 21)),
        Buffer::F32(data(rows * width, 22)),
        Buffer::F32(vec![0.0; rows * width]),
        Buffer::F32(vec![0.0; rows]),
        Buffer::F32(vec![0.0; rows * width]),
    ];
    let case = Case::new(k, inputs, &[rows as i64, width as i64], rows as i64, 0.0);
    let mut gens = targets();
    gens.push(without_fma());
    check_all(&[case], &gens);
}

#[test]
fn dropout_matches_runtime_rng() {
    // Directly against tnc_bundle::rng, not only through the executor.
    let k = dropout_kernel();
    for codegen in CodeGen::ALL {
        let lib = compile(std::slice::from_ref(&k), &Gen::new("native", codegen));
        let f: libloading::Symbol<KernelFn> = unsafe { lib.lib.get(b"dropout") }.unwrap();
        let n = 4096usize;
        let (seed, step) = (42u64, 3i64);
        let x = vec![1.0f32; n];
        let mut y = vec![0.0f32; n];
        let mut mask = vec![0u8; 4 * n];
        let ptrs: [*mut c_void; 3] = [x.as_ptr() as *mut c_void, y.as_mut_ptr().cast(), mask.as_mut_ptr().cast()];
        let sizes = [n as i64, seed as i64, step];
        unsafe { f(ptrs.as_ptr(), sizes.as_ptr(), 0, n as i64) };
        for j in 0..n {
            let keep = tnc_bundle::rng::dropout_keep(seed, 0x1234_5678_9abc, j as u64, step as u64, 0.3);
            assert_eq!(mask[4 * j] != 0, keep, "{}: element {j}", codegen.name());
        }
        let kept = mask.iter().step_by(4).filter(|&&m| m != 0).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.03, "kept {kept}");
    }
}

#[test]
fn invalid_kernels_are_errors() {
    let target = CpuTarget::parse("x86-64-v3").unwrap();
    let bad = |body: Vec<Stmt>| {
        kernel(
            "bad",
            vec![buf("x", Elem::F32, Access::Read), buf("o", Elem::I32, Access::Write)],
            &["n"],
            &[],
            size(0),
            body,
        )
    };
    let cases = [
        (bad(vec![store(1, var(0), ld(0, var(0)))]), "stored into `o` must be an integer"),
        (bad(vec![store(1, var(0), var(9))]), "v9 is used before it is defined"),
        (bad(vec![store(0, f(1.0), f(1.0))]), "index of `x` must be an integer"),
        (bad(vec![store(2, var(0), i(1))]), "buffer 2 is not declared"),
        (bad(vec![store(1, var(0), size(3))]), "size argument 3"),
        (bad(vec![store(1, var(0), add(i(1), f(1.0)))]), "Add of an integer and f32"),
        (bad(vec![Stmt::If { cond: i(1), then: vec![], otherwise: vec![] }]), "`if` condition must be bool"),
        (bad(vec![let_(1, f(1.0)), let_(1, i(1))]), "v1 is redefined"),
        (bad(vec![store(1, var(0), un(Unary::Exp, i(1)))]), "Exp of an integer"),
    ];
    let cranelift = Gen::new("x86-64-v3", CodeGen::Cranelift);
    for (k, msg) in cases {
        let e = backend::emit_object(std::slice::from_ref(&k), &target).unwrap_err();
        assert!(e.contains(msg), "expected `{msg}` in: {e}");
        assert!(backend::emit_llvm_ir(std::slice::from_ref(&k), &target, false).is_err());
        let e = cranelift.shared_object(std::slice::from_ref(&k)).unwrap_err();
        assert!(e.contains(msg) && e.contains("kernel `bad`"), "Cranelift: expected `{msg}` in: {e}");
    }
    // Two kernels with one name.
    let k = broadcast_kernel();
    let e = backend::emit_object(&[k.clone(), k.clone()], &target).unwrap_err();
    assert!(e.contains("already in the module"), "{e}");
    let e = cranelift.shared_object(&[k.clone(), k]).unwrap_err();
    assert!(e.contains("already in the module"), "Cranelift: {e}");
    // Block kernels are a GPU's.
    let block = block_row_sum(BlockBug::None);
    let e = cranelift.shared_object(std::slice::from_ref(&block)).unwrap_err();
    assert!(e.contains("runs on GPUs only"), "Cranelift: {e}");
}

#[test]
fn unknown_target_lists_valid_ones() {
    let e = CpuTarget::parse("skylake").unwrap_err();
    assert!(
        e.contains("`skylake`") && e.contains("native") && e.contains("x86-64-v3") && e.contains("x86-64-v4"),
        "{e}"
    );
}

#[test]
fn v4_uses_zmm_registers() {
    // out[i] = x[i] * 2 + y[i] over the parallel index.
    let k = kernel(
        "axpy",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("y", Elem::F32, Access::Read),
            buf("out", Elem::F32, Access::Write),
        ],
        &["n"],
        &[],
        size(0),
        vec![store(2, var(0), add(mul(ld(0, var(0)), f(2.0)), ld(1, var(0))))],
    );
    let v4 = CpuTarget::parse("x86-64-v4").unwrap();
    let asm = backend::emit_asm(std::slice::from_ref(&k), &v4).unwrap();
    assert!(asm.contains("zmm"), "no zmm registers for x86-64-v4:\n{asm}");
    let v3 = CpuTarget::parse("x86-64-v3").unwrap();
    let asm = backend::emit_asm(std::slice::from_ref(&k), &v3).unwrap();
    assert!(asm.contains("ymm") && !asm.contains("zmm"), "x86-64-v3 must use ymm only:\n{asm}");
    if v4.host_supports() {
        let lib = compile(std::slice::from_ref(&k), &Gen::new("x86-64-v4", CodeGen::Llvm));
        let n = 1001;
        let inputs = [Buffer::F32(data(n, 11)), Buffer::F32(data(n, 12)), Buffer::F32(vec![0.0; n])];
        check(&lib, "x86-64-v4", &k, &inputs, &[n as i64], n as i64, 0.0);
    }
}

#[test]
fn ir_has_attributes_and_loop_hints() {
    let v4 = CpuTarget::parse("x86-64-v4").unwrap();
    let ir = backend::emit_llvm_ir(&[broadcast_kernel()], &v4, false).unwrap();
    for s in [
        "define void @broadcast(ptr nocapture readonly %buffers, ptr nocapture readonly %sizes, i64 %begin, i64 %end)",
        "\"target-cpu\"=\"x86-64-v4\"",
        "\"prefer-vector-width\"=\"512\"",
        "+avx512f",
        "llvm.loop.vectorize.enable",
    ] {
        assert!(ir.contains(s), "missing `{s}` in:\n{ir}");
    }
    let ir = backend::emit_llvm_ir(&[math_kernel()], &v4, true).unwrap();
    assert!(ir.contains("@tanhf") && ir.contains("@llvm.maximum.") && ir.contains("@llvm.minimum."), "{ir}");
}

/// Serial reductions dealt to vector lanes (`kernel::lanes`): the generated code runs the
/// dealt kernel bit for bit like the executor, and the dealt kernel computes what the
/// serial one did (the maximum exactly, sums to rounding), for rows shorter than one
/// round of lanes, with a partial last round, and with a sum carried in.
#[test]
fn lane_reductions_match_the_serial_loops() {
    let serial = [reduce_kernel(), kahan_kernel()];
    let dealt: Vec<Kernel> = serial.iter().map(lanes::deal_reductions).collect();
    for (s, d) in serial.iter().zip(&dealt) {
        let text = print::to_text(d);
        assert!(text.contains("for vector") && text.contains("% 16"), "`{}` was not dealt:\n{text}", s.name);
    }
    for gen in targets() {
        let lib = compile(&dealt, &gen);
        for cols in [5usize, 16, 101] {
            let rows = 7usize;
            let x = data(rows * cols, 11);
            let reduce_in = [Buffer::F32(x.clone()), Buffer::F32(vec![0.0; rows]), Buffer::F32(vec![0.0; rows])];
            let init: Vec<f32> = (0..rows).map(|r| 1e3 * r as f32).collect();
            let kahan_in = [Buffer::F32(x), Buffer::F32(init), Buffer::F32(vec![0.0; rows])];
            let sizes = [rows as i64, cols as i64];
            for (k, (serial, inputs)) in dealt.iter().zip(serial.iter().zip([&reduce_in, &kahan_in])) {
                check(&lib, &gen.name, k, inputs, &sizes, rows as i64, 0.0);
                let run = |k: &Kernel| {
                    let mut b = inputs.to_vec();
                    exec::run(k, &mut b, &sizes, 0, rows as i64).unwrap();
                    b
                };
                let (want, got) = (run(serial), run(k));
                for (bi, (w, g)) in want.iter().zip(&got).enumerate().skip(if k.name == "kahan" { 2 } else { 1 }) {
                    let (Buffer::F32(w), Buffer::F32(g)) = (w, g) else { unreachable!("f32 outputs") };
                    for (a, b) in g.iter().zip(w) {
                        let exact = k.name == "reduce" && bi == 2;
                        let ok = if exact { a.to_bits() == b.to_bits() } else { (a - b).abs() <= 2e-6 * b.abs() };
                        assert!(ok, "`{}` buffer {bi}, {cols} columns: dealt {a:e}, serial {b:e}", k.name);
                    }
                }
            }
        }
    }
}

/// 16-bit buffers and rounding, generated code against the executor bit for bit: ties
/// (to even), values past f16's range, subnormal halves, ±0, ±∞ and NaN.
/// `out[i] = fma(a[i], b[i], c[i])`, as a vector loop over rows of 37: rounded once in
/// the executor and in every generated kernel. The first element is chosen so that the
/// product rounded alone would lose the answer: (1 + 2⁻¹²)² − (1 + 2⁻¹¹) is 2⁻²⁴ exactly,
/// and 0 when a · b is rounded before the addition.
#[test]
fn fused_multiply_add_rounds_once_everywhere() {
    let (r, j) = (0, 1);
    let at = add(mul(var(r), i(37)), var(j));
    let k = kernel(
        "fused_multiply_add",
        vec![
            buf("a", Elem::F32, Access::Read),
            buf("b", Elem::F32, Access::Read),
            buf("c", Elem::F32, Access::Read),
            buf("out", Elem::F32, Access::Write),
        ],
        &["R"],
        &[],
        size(0),
        vec![for_(
            j,
            i(37),
            LoopKind::Vector,
            vec![store(3, at.clone(), Expr::mul_add(ld(0, at.clone()), ld(1, at.clone()), ld(2, at)))],
        )],
    );
    let rows = 5usize;
    let n = rows * 37;
    let (mut a, mut b, mut c) = (data(n, 13), data(n, 14), data(n, 15));
    let x = 1.0 + 2f32.powi(-12);
    (a[0], b[0], c[0]) = (x, x, -(1.0 + 2f32.powi(-11)));
    assert_eq!(x * x + c[0], 0.0, "rounded twice");
    let mut bufs = [Buffer::F32(a.clone()), Buffer::F32(b.clone()), Buffer::F32(c.clone()), Buffer::F32(vec![0.0; n])];
    exec::run(&k, &mut bufs, &[rows as i64], 0, rows as i64).unwrap();
    let Buffer::F32(want) = &bufs[3] else { unreachable!("an f32 buffer") };
    assert_eq!(want[0], 2f32.powi(-24), "the executor rounds once");
    for (w, ((&x, &y), &z)) in want.iter().zip(a.iter().zip(&b).zip(&c)) {
        assert_eq!(w.to_bits(), x.mul_add(y, z).to_bits());
    }
    let inputs = [Buffer::F32(a), Buffer::F32(b), Buffer::F32(c), Buffer::F32(vec![0.0; n])];
    for gen in targets() {
        let lib = compile(std::slice::from_ref(&k), &gen);
        check(&lib, &gen.name, &k, &inputs, &[rows as i64], rows as i64, 0.0);
    }
}

fn sixteen_bit_case() -> Case {
    let k = sixteen_bit_kernel();
    let mut x = data(300, 12);
    let special = [
        0.0,
        -0.0,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-11),
        65504.0,
        65520.0,
        70000.0,
        3.0e-6,
        6.0e-8,
        1e-40,
        3.4e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
    ];
    x[..special.len()].copy_from_slice(&special);
    let n = x.len();
    let b: Vec<u16> = (0..n as u16).map(|i| i.wrapping_mul(40503)).collect();
    let inputs = vec![
        Buffer::F32(x),
        Buffer::BF16(b),
        Buffer::BF16(vec![0; n]),
        Buffer::F16(vec![0; n]),
        Buffer::F32(vec![0.0; n]),
    ];
    Case::new(k, inputs, &[n as i64], n as i64, 0.0)
}

#[test]
fn sixteen_bit_floats_round_like_the_executor() {
    check_all(&[sixteen_bit_case()], &targets());
}

#[test]
fn identical_kernels_are_emitted_once() {
    let a = broadcast_kernel();
    let b = Kernel { name: "broadcast_layer2".into(), ..a.clone() };
    let c = reduce_kernel();
    let d = backend::dedup_kernels(&[a, c, b]).unwrap();
    assert_eq!(d.kernels.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["broadcast", "reduce"]);
    assert_eq!(d.names["broadcast_layer2"], "broadcast");
    assert_eq!(d.names["broadcast"], "broadcast");
    assert_eq!(d.names["reduce"], "reduce");
    let e = backend::dedup_kernels(&[broadcast_kernel(), Kernel { name: "broadcast".into(), ..reduce_kernel() }]);
    assert!(e.is_err());
}

#[test]
fn missing_linker_is_a_clear_error() {
    // Run `link_shared` with CC pointing nowhere, in a child process so the environment
    // of other tests is untouched.
    if std::env::var("TNC_TEST_MISSING_CC").is_ok() {
        let e = backend::link_shared(&[PathBuf::from("x.o")], &std::env::temp_dir().join("never.so")).unwrap_err();
        assert!(e.contains("was not found") && e.contains("tnc-no-such-cc"), "{e}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "missing_linker_is_a_clear_error", "--nocapture"])
        .env("TNC_TEST_MISSING_CC", "1")
        .env("CC", "tnc-no-such-cc")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
