//! The NVPTX back end: PTX that NVIDIA's assembler accepts. Hand-built kernels (the same
//! as `cpu_backends.rs`: elementwise, reductions, every math function, branches, casts, local
//! arrays, dropout) and every model's schedule (full pipeline, `recognize` on) are emitted
//! as PTX for each GPU target and assembled with `ptxas -v` for sm_80 and sm_90; the
//! registers and spills `ptxas` reports are printed per kernel (`--nocapture`).
//!
//! `ptxas` and `libdevice.10.bc` come from the `nvidia-cuda-nvcc-cu12` wheel, which
//! `scripts/setup.sh` installs: without it these tests fail (they do not skip). There is no
//! GPU here. For a machine with one, `TNC_GPU_CASES=dir cargo test -p tnc-compiler --test
//! ptx dump_gpu_cases` writes PTX, inputs and the executor's outputs (without the variable
//! the test only checks the hand-built cases), and `scripts/ptx_run.py dir SET...` runs and compares them through
//! the CUDA driver. On an H100 (driver 580): the hand-built kernels (sm80 and sm90 PTX)
//! match within 1.2e-7 relative, every step of every model (sm90 PTX) within 7.1e-6.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use tnc_compiler::backend::{self, GpuTarget};
use tnc_compiler::kernel::exec;
use tnc_compiler::kernel::*;

mod common;
use common::kernels::*;

// ---- ptxas ----

/// `ptxas` from the `nvidia-cuda-nvcc-cu12` wheel (or `$TNC_PTXAS`). Panics, failing the
/// test, when it is missing: CI installs it with scripts/setup.sh.
fn ptxas() -> PathBuf {
    if let Some(p) = std::env::var_os("TNC_PTXAS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let dir = backend::llvm::ptx::cuda_nvcc_dir().unwrap_or_else(|| {
        panic!(
            "the `nvidia-cuda-nvcc-cu12` Python wheel (ptxas and libdevice) is not installed: run \
             scripts/setup.sh (or `python3 -m pip install nvidia-cuda-nvcc-cu12`)"
        )
    });
    let p = dir.join("bin/ptxas");
    assert!(p.is_file(), "{} is missing: reinstall the wheel with scripts/setup.sh", p.display());
    p
}

/// What `ptxas -v` reports for one kernel.
#[derive(Clone, Debug, Default, PartialEq)]
struct Stats {
    name: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    shared: u32,
}

/// The number before `unit` in `text` (`"12 registers"` → 12).
fn number_before(text: &str, unit: &str) -> Option<u32> {
    let at = text.find(unit)?;
    text[..at].split_whitespace().last()?.parse().ok()
}

/// Parse `ptxas -v` output: per function, "Compiling entry function 'NAME' for 'sm_80'",
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads", "Used N registers,
/// ... N bytes smem ...".
fn parse_ptxas(out: &str) -> Vec<Stats> {
    let mut all: Vec<Stats> = vec![];
    for line in out.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            all.push(Stats { name, ..Stats::default() });
            continue;
        }
        let Some(s) = all.last_mut() else { continue };
        if line.contains("stack frame") {
            s.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            s.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            s.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used ") {
            s.registers = number_before(line, "registers").unwrap_or(0);
            s.shared = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    all
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Assemble `ptx` for `arch` (`sm_80`, ...) with `ptxas -v`; panic with ptxas' messages on
/// any error or warning. Returns each entry's statistics.
fn assemble(ptx: &str, arch: &str, what: &str) -> Vec<Stats> {
    let dir = std::env::temp_dir().join(format!(
        "tnc-ptx-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, obj) = (dir.join("kernels.ptx"), dir.join("kernels.cubin"));
    std::fs::write(&src, ptx).unwrap();
    let out = Command::new(ptxas())
        .arg(format!("-arch={arch}"))
        .args(["-v", "--warning-as-error", "-o"])
        .arg(&obj)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ptxas: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{what}: ptxas -arch={arch} failed ({}):\n{text}", out.status);
    assert!(!text.contains("error") && !text.contains("warning"), "{what}: ptxas -arch={arch}:\n{text}");
    parse_ptxas(&text)
}

fn report(what: &str, arch: &str, stats: &[Stats]) {
    for s in stats {
        eprintln!(
            "{what} {arch} {:<40} {:>3} registers, {:>4} B stack, {:>4} B spill stores, {:>4} B spill loads, {} B smem",
            s.name, s.registers, s.stack, s.spill_stores, s.spill_loads, s.shared
        );
    }
}

/// Emit `kernels` for `targets`, check the PTX's header and entries, and assemble
/// it for sm_80 and sm_90 (from the `sm80` and `sm90` PTX). Returns the sm_80 and sm_90
/// statistics.
fn check_kernels(kernels: &[Kernel], what: &str, targets: &[&str]) -> Vec<(String, Vec<Stats>)> {
    let mut out = vec![];
    for name in targets {
        let target = GpuTarget::parse(name).unwrap();
        let ptx = backend::emit_ptx(kernels, &target).unwrap_or_else(|e| panic!("{what} {name}: {e}"));
        let version = format!(".version {}.{}", target.ptx_version / 10, target.ptx_version % 10);
        assert!(ptx.contains(&version), "{what} {name}: no `{version}`:\n{ptx}");
        assert!(ptx.contains(&format!(".target {}", target.sm)), "{what} {name}: wrong .target");
        assert!(ptx.contains(".address_size 64"), "{what} {name}");
        for k in kernels {
            assert!(ptx.contains(&format!(".entry {}(", k.name)), "{what} {name}: no entry `{}`:\n{ptx}", k.name);
        }
        assert_eq!(ptx.matches(".entry ").count(), kernels.len(), "{what} {name}: one .entry per kernel");
        assert!(!ptx.contains(".extern .func"), "{what} {name}: unresolved functions:\n{ptx}");
        if let Some(dir) = std::env::var_os("TNC_PTX_DUMP") {
            let file = format!("{}-{name}.ptx", what.replace(['/', ' '], "_"));
            std::fs::write(Path::new(&dir).join(file), &ptx).unwrap();
        }
        if matches!(*name, "sm80" | "sm90" | "sm90a") {
            let stats = assemble(&ptx, &target.sm, what);
            assert_eq!(stats.len(), kernels.len(), "{what} {name}: ptxas compiled {stats:?}");
            report(what, &target.sm, &stats);
            if *name != "sm90a" {
                out.push((target.sm.clone(), stats));
            }
        }
    }
    out
}

fn hand_kernels() -> Vec<Kernel> {
    vec![
        broadcast_kernel(),
        math_kernel(),
        reduce_kernel(),
        branch_kernel(),
        cast_kernel(),
        array_kernel(),
        dropout_kernel(),
    ]
}

// ---- tests ----

#[test]
fn hand_built_kernels_assemble() {
    let kernels = hand_kernels();
    // One module with every kernel, and each kernel alone (libdevice only where needed).
    for (_, stats) in check_kernels(&kernels, "hand-built", backend::GPU_TARGETS) {
        for s in stats {
            assert_eq!((s.spill_stores, s.spill_loads), (0, 0), "{s:?}");
        }
    }
    for k in &kernels {
        check_kernels(std::slice::from_ref(k), &k.name, backend::GPU_TARGETS);
    }
}

#[test]
fn ptx_has_the_gpu_mapping() {
    let target = GpuTarget::parse("sm90").unwrap();
    let ptx = backend::emit_ptx(&[broadcast_kernel()], &target).unwrap();
    // The calling convention: two pointers and two 64-bit integers.
    for s in [
        ".visible .entry broadcast(",
        ".param .u64 broadcast_param_0",
        ".param .u64 broadcast_param_1",
        ".param .u64 broadcast_param_2",
        ".param .u64 broadcast_param_3",
        "%ctaid.x",
        "%ntid.x",
        "%tid.x",
        "ld.global",
        "st.global",
    ] {
        assert!(ptx.contains(s), "missing `{s}`:\n{ptx}");
    }
    // Math goes through libdevice, exact where the executor is exact.
    let ir = backend::emit_nvptx_ir(&[math_kernel()], &target, false).unwrap();
    for f in ["__nv_expf", "__nv_logf", "__nv_sinf", "__nv_cosf", "__nv_tanhf", "__nv_powf", "__nv_fmodf"] {
        assert!(ir.contains(&format!("@{f}(")), "no call to {f}");
    }
    assert!(ir.contains("ptx_kernel void @math(") && ir.contains("!\"kernel\", i32 1"), "{ir}");
    assert!(ir.contains("addrspace(1)"), "{ir}");
    let ptx = backend::emit_ptx(&[math_kernel()], &target).unwrap();
    // libdevice's functions use `ex2.approx.ftz`, `rcp.approx.ftz` and `div.approx` on
    // reduced arguments, within their documented error bounds; everything else keeps
    // subnormals.
    let ftz: Vec<&str> = ptx.lines().filter(|l| l.contains(".ftz") && !l.contains(".approx")).collect();
    assert!(ftz.is_empty(), "{}", ftz.join("\n"));
    // Without libdevice: sqrt, division, reciprocal and rsqrt are IEEE, correctly rounded.
    let ops = [Unary::Sqrt, Unary::Rsqrt, Unary::Recip];
    let mut body: Vec<Stmt> = ops
        .iter()
        .enumerate()
        .map(|(j, &op)| store(1, add(mul(var(0), i(4)), i(j as i64)), un(op, ld(0, var(0)))))
        .collect();
    body.push(store(1, add(mul(var(0), i(4)), i(3)), bin(Binary::Div, ld(0, var(0)), f(3.0))));
    let k = kernel(
        "ieee",
        vec![buf("x", Elem::F32, Access::Read), buf("o", Elem::F32, Access::Write)],
        &["n"],
        &[],
        size(0),
        body,
    );
    let ptx = backend::emit_ptx(&[k], &target).unwrap();
    let fast: Vec<&str> = ptx.lines().filter(|l| l.contains(".ftz") || l.contains(".approx")).collect();
    assert!(fast.is_empty(), "{}", fast.join("\n"));
    assert!(ptx.contains("sqrt.rn.f32") && ptx.contains("div.rn.f32"), "{ptx}");
}

/// A block kernel (threads of a block sharing an array, with barriers): its shared array
/// is static shared memory of the size it declares, barriers are `bar.sync`, the block
/// index is `ctaid.x` and the thread `tid.x`; it assembles for sm_80 and sm_90 without
/// spills. On a CPU target it is an error.
#[test]
fn block_kernels_use_shared_memory_and_barriers() {
    let k = block_row_sum(BlockBug::None);
    let target = GpuTarget::parse("sm80").unwrap();
    let ptx = backend::emit_ptx(std::slice::from_ref(&k), &target).unwrap();
    for s in [".shared .align 16 .b8", "bar.sync", "%ctaid.x", "%tid.x", "ld.shared.f32", "st.shared.f32"] {
        assert!(ptx.contains(s), "missing `{s}`:\n{ptx}");
    }
    assert!(!ptx.contains("%ntid.x"), "a block kernel does not scale the block index:\n{ptx}");
    for (arch, stats) in check_kernels(std::slice::from_ref(&k), "block kernel", &["sm80", "sm90"]) {
        let s = &stats[0];
        assert_eq!(s.shared, 32 * 4, "{arch}: {s:?}");
        assert_eq!((s.spill_stores, s.spill_loads), (0, 0), "{arch}: {s:?}");
    }
    let cpu = backend::CpuTarget::parse("x86-64-v3").unwrap();
    let e = backend::emit_llvm_ir(&[k], &cpu, false).unwrap_err();
    assert!(e.contains("runs on GPUs only"), "{e}");
}

#[test]
fn unknown_gpu_targets_are_rejected() {
    for bad in ["sm100", "sm100a", "sm120", "sm_90", "sm75", "sm70", "x86-64-v3", "gfx90a"] {
        let e = GpuTarget::parse(bad).unwrap_err();
        assert!(e.contains(bad) && e.contains("sm80, sm86, sm89, sm90, sm90a"), "{e}");
    }
    let e = GpuTarget::parse("sm100").unwrap_err();
    assert!(e.contains("sm100 is not supported by LLVM 19's NVPTX back end"), "{e}");
}

#[test]
fn launch_shape() {
    assert_eq!(backend::GPU_BLOCK, 256);
    assert_eq!(backend::gpu_launch(0), (0, 256));
    assert_eq!(backend::gpu_launch(1), (1, 256));
    assert_eq!(backend::gpu_launch(512), (2, 256));
    assert_eq!(backend::gpu_launch(513), (3, 256));
}

#[test]
fn invalid_kernels_are_errors() {
    let target = GpuTarget::parse("sm80").unwrap();
    let k =
        kernel("bad", vec![buf("o", Elem::I32, Access::Write)], &["n"], &[], size(0), vec![store(0, var(0), f(1.0))]);
    let e = backend::emit_ptx(&[k], &target).unwrap_err();
    assert!(e.contains("stored into `o` must be an integer"), "{e}");
    let e = backend::emit_ptx(&[reduce_kernel(), reduce_kernel()], &target).unwrap_err();
    assert!(e.contains("already in the module"), "{e}");
}

#[test]
fn missing_libdevice_is_a_clear_error() {
    // In a child process, so the environment of other tests is untouched.
    if std::env::var("TNC_TEST_MISSING_LIBDEVICE").is_ok() {
        let target = GpuTarget::parse("sm80").unwrap();
        let e = backend::emit_ptx(&[math_kernel()], &target).unwrap_err();
        assert!(e.contains("TNC_LIBDEVICE") && e.contains("/nonexistent/libdevice.10.bc"), "{e}");
        // Kernels without math need no libdevice.
        backend::emit_ptx(&[reduce_kernel()], &target).unwrap();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", "missing_libdevice_is_a_clear_error", "--nocapture"])
        .env("TNC_TEST_MISSING_LIBDEVICE", "1")
        .env("TNC_LIBDEVICE", "/nonexistent/libdevice.10.bc")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn ptxas_output_is_parsed() {
    let text = "ptxas info    : 0 bytes gmem\n\
        ptxas info    : Compiling entry function 'g3_linear_attention' for 'sm_80'\n\
        ptxas info    : Function properties for g3_linear_attention\n    \
        24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
        ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0], 1024 bytes smem\n";
    let s = parse_ptxas(text);
    let want = Stats {
        name: "g3_linear_attention".into(),
        registers: 40,
        stack: 24,
        spill_stores: 8,
        spill_loads: 12,
        shared: 1024,
    };
    assert_eq!(s, [want]);
}

// ---- models ----

fn models() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = vec![];
    for dir in ["models", "models/ablations"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "tn") && p.file_name().is_some_and(|n| n != "std.tn") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The tiny configuration of the model tests (`tests/common`).
fn tiny_sets(path: &Path) -> Vec<String> {
    common::tiny_sets_of(&std::fs::read_to_string(path).expect("model readable"))
}

/// The full pipeline (recognize on), fusion, memory plan, schedule: the model's kernels.
fn model_kernels(path: &Path) -> Vec<Kernel> {
    use tnc_compiler::frontend::{self, Input, Request};
    use tnc_compiler::{passes, schedule};
    let sets = tiny_sets(path);
    let (sources, g) = frontend::elaborate(Input::Path(path), &Request { sets: &sets, model: None });
    let mut g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    for p in passes::pipeline() {
        g = p.run(g).unwrap_or_else(|d| panic!("{}: {}", p.name(), d.message));
    }
    // As `tnc compile --target sm80` schedules them (with the static 48 KB of shared
    // memory): row kernels and attention as blocks.
    let s = tnc_compiler::pipeline::scheduled_with(&g, &schedule::ScheduleOptions::gpu())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    backend::dedup_kernels(&s.kernels).unwrap().kernels
}

#[test]
fn every_model_assembles() {
    let mut attention_spills = vec![];
    for path in models() {
        let model = path.file_name().unwrap().to_string_lossy().into_owned();
        let kernels: Vec<Kernel> = model_kernels(&path);
        assert!(kernels.iter().any(|k| k.threads.is_some()), "{model}: no row kernel became a block");
        let mut worst = (0u32, 0u32);
        for (arch, stats) in check_kernels(&kernels, &model, &["sm80", "sm90"]) {
            for s in &stats {
                worst = (worst.0.max(s.registers), worst.1.max(s.spill_stores + s.spill_loads));
                if s.name.contains("attention") && s.spill_stores + s.spill_loads > 0 {
                    attention_spills.push(format!("{model} {arch} {s:?}"));
                }
            }
        }
        eprintln!("{model}: {} kernels, at most {} registers, worst spills {} B", kernels.len(), worst.0, worst.1);
    }
    assert!(attention_spills.is_empty(), "attention kernels spill:\n{}", attention_spills.join("\n"));
}

/// `tnc compile --target T` bundles against what `ptxas -v` reports for their PTX: every
/// kernel's launch shape in the manifest can run — the block's registers fit the register
/// file (64K per SM on sm_80 … sm_90), static shared memory is what the kernel declares
/// (at most 48 KB), dynamic shared memory is exactly the rest, and the two together stay
/// within the target's limit per block — and no attention kernel spills or uses local
/// memory (their arrays are in shared memory). Every model at test size for sm80 and
/// sm90, and full-size T1 (d = 64, 64-token blocks: its block attention needs dynamic
/// shared memory) for sm80 and sm86 (99 KB per block: the backward's 128 KB does not
/// fit, so it stays one thread per block, and may use local memory there).
#[test]
fn bundles_launch_within_ptxas_figures() {
    use tnc_compiler::driver;
    use tnc_compiler::frontend::{self, Input, Request};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cases: Vec<(PathBuf, Vec<String>, &str)> = vec![];
    for path in models() {
        for target in ["sm80", "sm90"] {
            cases.push((path.clone(), tiny_sets(&path), target));
        }
    }
    for target in ["sm80", "sm86"] {
        cases.push((root.join("models/transnormer_t1.tn"), vec![], target));
    }
    for (path, sets, target) in cases {
        let what = format!(
            "{} {target}{}",
            path.file_stem().unwrap().to_string_lossy(),
            if sets.is_empty() { " (full size)" } else { "" }
        );
        let (sources, g) = frontend::elaborate(Input::Path(&path), &Request { sets: &sets, model: None });
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let dir = std::env::temp_dir().join(format!(
            "tnc-launch-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let compiled =
            driver::compile(g, target, &dir, Default::default(), Vec::new()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let manifest: tnc_bundle::Manifest =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let gpu = GpuTarget::parse(target).unwrap();
        let stats = assemble(&ptx, &gpu.sm, &what);
        let staged = ["_linear_attention", "_block_attention", "_block_attention_grad"];
        for (entry, kernel) in manifest.kernels.iter().zip(&compiled.schedule.kernels) {
            let s = stats
                .iter()
                .find(|s| s.name == entry.symbol)
                .unwrap_or_else(|| panic!("{what}: no `{}`", entry.symbol));
            let launch = entry.gpu.as_ref().unwrap_or_else(|| panic!("{what}: `{}` has no launch shape", entry.name));
            let threads: u32 = launch.block.iter().product();
            assert_eq!(Some(launch.block[0]), kernel.threads.or(Some(backend::GPU_BLOCK)), "{what} {}", entry.name);
            assert!(
                s.registers <= 255 && s.registers * threads <= 65536,
                "{what} {}: {s:?} × {threads} threads",
                entry.name
            );
            let (layout, end) = kernel.shared_layout();
            let declared: u32 = kernel_shared_floats(kernel) * 4;
            let dynamic = launch.shared_bytes;
            if dynamic > 0 {
                assert_eq!(s.shared, 0, "{what} {}: dynamic shared memory only", entry.name);
                assert_eq!(dynamic as usize, end, "{what} {}: the manifest's dynamic shared memory", entry.name);
            } else {
                assert!(
                    declared <= s.shared && s.shared as usize <= end,
                    "{what} {}: {s:?}, declared {declared} B in {} arrays",
                    entry.name,
                    layout.len()
                );
                assert!(s.shared as usize <= STATIC_SHARED_BYTES, "{what} {}: {s:?}", entry.name);
            }
            assert!(
                (s.shared + dynamic) as usize <= gpu.max_shared_bytes(),
                "{what} {}: {s:?} + {dynamic} B",
                entry.name
            );
            if entry.name.contains("attention") {
                assert_eq!(s.spill_stores + s.spill_loads, 0, "{what} {}: spills: {s:?}", entry.name);
            }
            let staged = staged.iter().any(|n| entry.name.ends_with(n));
            if staged && kernel.threads.is_some() {
                // libdevice's sinf/cosf keep a 7-word table on the stack for the
                // Payne–Hanek reduction of large arguments (a rotation by position
                // computed in the kernel, as RetNet's fixed angles are); nothing else may.
                let text = tnc_compiler::kernel::print::to_text(kernel);
                let trig = text.contains("sin(") || text.contains("cos(");
                let allowed = if trig { 32 } else { 0 };
                assert!(s.stack <= allowed, "{what} {}: local memory: {s:?}", entry.name);
            }
        }
        let blocks: Vec<&str> = manifest
            .kernels
            .iter()
            .zip(&compiled.schedule.kernels)
            .filter(|(e, k)| k.threads.is_some() && staged.iter().any(|n| e.name.ends_with(n)))
            .map(|(e, _)| e.name.as_str())
            .collect();
        eprintln!("{what}: {} kernels, staged attention blocks {blocks:?}", manifest.kernels.len());
        if sets.is_empty() {
            // Full-size T1: every linear attention and the block-attention forward are blocks
            // on every target, its backward too where 128 KB per block is allowed.
            let want = if target == "sm86" { 5 } else { 6 };
            assert_eq!(blocks.len(), want, "{what}: {blocks:?}");
        }
    }
}

/// `tnc compile --precision bf16 --train` for sm80 (and T1 for sm90), every model at test size: the
/// dense products (bf16 operands) run on tensor cores — the PTX has `mma.sync` with bf16
/// inputs, once per warp product of each tensor-core kernel — it assembles, and no
/// tensor-core kernel spills or uses local memory (its 32 accumulators and 32 fragment
/// registers per thread stay in registers).
#[test]
fn bf16_bundles_use_tensor_cores() {
    use tnc_compiler::driver;
    use tnc_compiler::frontend::{self, Input, Request};
    fn has_mma(stmts: &[Stmt]) -> bool {
        stmts.iter().any(|s| match s {
            Stmt::Mma { .. } => true,
            Stmt::For { body, .. } => has_mma(body),
            Stmt::If { then, otherwise, .. } => has_mma(then) || has_mma(otherwise),
            _ => false,
        })
    }
    for path in models() {
        // Every model for sm80, and T1 for sm90 too (the same kernels; the suite's time).
        let t1 = path.file_stem().is_some_and(|s| s == "transnormer_t1");
        for &target in if t1 { &["sm80", "sm90"][..] } else { &["sm80"][..] } {
            let what = format!("{} {target} bf16", path.file_stem().unwrap().to_string_lossy());
            let sets = tiny_sets(&path);
            let (sources, g) = frontend::elaborate(Input::Path(&path), &Request { sets: &sets, model: None });
            let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
            let dir = std::env::temp_dir().join(format!(
                "tnc-mma-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let opts =
                driver::Options { train: true, precision: tnc_compiler::passes::Policy::Bf16, ..Default::default() };
            let compiled = driver::compile(g, target, &dir, opts, Vec::new()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let manifest: tnc_bundle::Manifest =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(d) = std::env::var_os("TNC_PTX_DUMP") {
                std::fs::write(Path::new(&d).join(format!("{}.ptx", what.replace(' ', "_"))), &ptx).unwrap();
            }
            let stats = assemble(&ptx, &GpuTarget::parse(target).unwrap().sm, &what);
            // Kernels with the same code share one PTX function (`backend::dedup_kernels`).
            let mut symbols = std::collections::BTreeSet::new();
            for (entry, kernel) in manifest.kernels.iter().zip(&compiled.schedule.kernels) {
                if !has_mma(&kernel.body) {
                    continue;
                }
                symbols.insert(entry.symbol.clone());
                let s = stats
                    .iter()
                    .find(|s| s.name == entry.symbol)
                    .unwrap_or_else(|| panic!("{what}: no `{}`", entry.symbol));
                assert_eq!((s.spill_stores, s.spill_loads, s.stack), (0, 0, 0), "{what} {}: {s:?}", entry.name);
                assert_eq!(entry.gpu.as_ref().map(|g| g.block[0]), Some(128), "{what} {}", entry.name);
            }
            assert!(!symbols.is_empty(), "{what}: no dense product on tensor cores");
            // Each function issues `mma.sync` (LLVM drops the products whose elements lie
            // outside C at these constant sizes, so there may be fewer than 16).
            let mut mmas = 0;
            for symbol in &symbols {
                let start = ptx.find(&format!(".entry {symbol}(")).unwrap();
                let end = ptx[start..].find("\n}\n").map_or(ptx.len(), |e| start + e);
                let n = ptx[start..end].matches("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32").count();
                assert!((1..=16).contains(&n), "{what} {symbol}: {n} mma.sync");
                mmas += n;
            }
            eprintln!("{what}: {} tensor-core functions, {mmas} mma.sync", symbols.len());
        }
    }
}

/// Floats of a kernel's shared arrays.
fn kernel_shared_floats(k: &Kernel) -> u32 {
    fn walk(stmts: &[Stmt]) -> u32 {
        stmts
            .iter()
            .map(|s| match s {
                Stmt::Shared { len, .. } => *len as u32,
                Stmt::For { body, .. } => walk(body),
                Stmt::If { then, otherwise, .. } => walk(then) + walk(otherwise),
                _ => 0,
            })
            .sum()
    }
    walk(&k.body)
}

// ---- cases for a GPU ----

/// Input data for a dumped case.
fn fill(elem: Elem, n: usize, seed: u64) -> exec::Buffer {
    match elem {
        Elem::F32 => exec::Buffer::F32(data(n, seed).into_iter().map(|x| x * 0.3).collect()),
        Elem::BF16 => exec::Buffer::BF16(
            data(n, seed).into_iter().map(|x| tnc_compiler::kernel::math::bf16_bits(x * 0.3)).collect(),
        ),
        Elem::F16 => exec::Buffer::F16(
            data(n, seed).into_iter().map(|x| tnc_compiler::kernel::math::f16_bits(x * 0.3)).collect(),
        ),
        Elem::I32 => exec::Buffer::I32((0..n).map(|j| ((j as u64 * 7 + seed) % 32) as i32).collect()),
        Elem::U8 => exec::Buffer::U8((0..n).map(|j| ((j as u64 + seed) % 3 == 0) as u8).collect()),
    }
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| (tnc_bundle::rng::normal(seed, 1, i as u64, 0) * 3.0) as f32).collect()
}

fn bytes(b: &exec::Buffer) -> Vec<u8> {
    tnc_compiler::schedule::run::to_bytes(b, b.len() * b.elem_bytes())
}

fn typed(bytes: &[u8], elem: Elem) -> exec::Buffer {
    tnc_compiler::schedule::run::to_typed(bytes, elem)
}

/// The value of an extent expression.
fn int(e: &Expr, sizes: &[i64]) -> i64 {
    match e {
        Expr::I64(i) => *i,
        Expr::Size(i) => sizes[*i],
        Expr::Binary(op, a, b) => {
            let (a, b) = (int(a, sizes), int(b, sizes));
            match op {
                Binary::Add => a + b,
                Binary::Sub => a - b,
                Binary::Mul => a * b,
                Binary::Div => a / b,
                Binary::Rem => a % b,
                Binary::Max => a.max(b),
                Binary::Min => a.min(b),
                _ => panic!("extent operator {op:?}"),
            }
        }
        e => panic!("extent {e:?}"),
    }
}

/// Writes a set of cases for `scripts/ptx_run.py`: `<set>.ptx` and `<set>.json` (per case:
/// kernel, sizes, extent, and per buffer its element type, access, input file and the
/// executor's result file).
struct Cases {
    dir: PathBuf,
    set: String,
    /// Whether written buffers start as 0xFF bytes on the GPU, so that an element the
    /// kernel should write but doesn't is caught: only where the kernel writes all of
    /// them (a model's buffers are shared, its kernels write parts of them).
    prefill: bool,
    cases: Vec<serde_json::Value>,
}

impl Cases {
    fn add(&mut self, k: &Kernel, entry: &str, inputs: &[exec::Buffer], sizes: &[i64]) -> Vec<exec::Buffer> {
        let mut want = inputs.to_vec();
        exec::run_all(k, &mut want, sizes).unwrap_or_else(|e| panic!("{}: {e}", k.name));
        let c = self.cases.len();
        let mut bufs = vec![];
        for (j, (d, (i, w))) in k.buffers.iter().zip(inputs.iter().zip(&want)).enumerate() {
            let (fi, fw) = (format!("{}_{c}_{j}_in.bin", self.set), format!("{}_{c}_{j}_want.bin", self.set));
            std::fs::write(self.dir.join(&fi), bytes(i)).unwrap();
            std::fs::write(self.dir.join(&fw), bytes(w)).unwrap();
            let elem = tnc_compiler::kernel::print::elem(d.elem);
            let access = match d.access {
                Access::Read => "r",
                Access::Write => "w",
                Access::ReadWrite => "rw",
            };
            bufs.push(serde_json::json!({"name": d.name, "elem": elem, "access": access, "in": fi, "want": fw}));
        }
        let extent = int(&k.extent, sizes);
        // `threads`: a block kernel, one block of that many threads per iteration;
        // `shared`: the dynamic shared memory of its launches.
        self.cases.push(serde_json::json!({
            "kernel": entry, "sizes": sizes, "extent": extent, "threads": k.threads,
            "shared": k.dynamic_shared_bytes(), "buffers": bufs,
        }));
        want
    }

    fn finish(self, ptx: String) {
        std::fs::write(self.dir.join(format!("{}.ptx", self.set)), ptx).unwrap();
        let text =
            serde_json::to_string_pretty(&serde_json::json!({"prefill": self.prefill, "cases": self.cases})).unwrap();
        std::fs::write(self.dir.join(format!("{}.json", self.set)), text).unwrap();
    }
}

/// Writes PTX plus inputs and the reference executor's outputs for the hand-built kernels
/// (sm80 and sm90 PTX) and, with `TNC_GPU_CASES=<dir>`, every model's steps (sm90 PTX),
/// for `scripts/ptx_run.py` to run on a GPU and compare. Without the variable it writes the
/// hand-built cases to a temporary folder and checks that they are complete.
#[test]
fn dump_gpu_cases() {
    let requested = std::env::var_os("TNC_GPU_CASES").map(PathBuf::from);
    let dir =
        requested.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("tnc-gpu-cases-{}", std::process::id())));
    std::fs::create_dir_all(&dir).unwrap();
    let mut kernels = hand_kernels();
    kernels.push(block_row_sum(BlockBug::None));
    for t in ["sm80", "sm90"] {
        let target = GpuTarget::parse(t).unwrap();
        let mut cases = Cases { dir: dir.clone(), set: format!("hand_{t}"), prefill: true, cases: vec![] };
        let n = 1000i64;
        for k in &kernels {
            let mut sizes: Vec<i64> = k.sizes.iter().map(|_| 0).collect();
            // Sizes: rows n, and inner dimensions as the kernels expect.
            match k.name.as_str() {
                "broadcast" => sizes.copy_from_slice(&[3, 5, 37]),
                "reduce" => sizes.copy_from_slice(&[19, 101]),
                "block_row_sum" => sizes[0] = 37,
                _ => sizes[0] = n,
            }
            sizes.extend([0xDEAD_BEEF_1234_5678u64 as i64, (1i64 << 32) + 17].iter().take(k.scalars.len()));
            let extent = int(&k.extent, &sizes) as usize;
            let len = match k.name.as_str() {
                "broadcast" => vec![3 * 5 * 37, 37, 5, 3 * 5 * 37],
                "reduce" => vec![19 * 101, 19, 19],
                "math" => vec![extent, extent * 23],
                "branch" => vec![extent * 4, extent * 4, extent, extent, extent],
                "casts" => vec![extent, extent, extent, extent * 15, extent * 4, extent * 8],
                "arrays" => vec![extent * 8, extent, extent],
                "dropout" => vec![extent, extent, extent * 4],
                "block_row_sum" => vec![extent * 64, extent],
                other => panic!("{other}"),
            };
            let mut inputs: Vec<exec::Buffer> =
                k.buffers.iter().zip(&len).enumerate().map(|(j, (d, &l))| fill(d.elem, l, j as u64 + 1)).collect();
            if k.name == "math" {
                if let exec::Buffer::F32(x) = &mut inputs[0] {
                    x[..8].copy_from_slice(&[
                        0.0,
                        -0.0,
                        f32::NAN,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                        1e-30,
                        88.0,
                        -100.0,
                    ]);
                    for (j, v) in x.iter_mut().enumerate().skip(8).step_by(7) {
                        *v *= 30.0 * (j % 5) as f32;
                    }
                }
            }
            cases.add(k, &k.name, &inputs, &sizes);
        }
        cases.finish(backend::emit_ptx(&kernels, &target).unwrap());
    }
    if requested.is_none() {
        for t in ["sm80", "sm90"] {
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("hand_{t}.json"))).unwrap()).unwrap();
            assert_eq!(json["cases"].as_array().unwrap().len(), kernels.len(), "one case per hand-built kernel");
            let ptx = std::fs::read_to_string(dir.join(format!("hand_{t}.ptx"))).unwrap();
            assert!(kernels.iter().all(|k| ptx.contains(&format!(".entry {}", k.name))), "every kernel is in the PTX");
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let target = GpuTarget::parse("sm90").unwrap();
    for path in models() {
        use tnc_compiler::frontend::{self, Input, Request};
        use tnc_compiler::{passes, schedule};
        let model = path.file_stem().unwrap().to_string_lossy().into_owned();
        let sets = tiny_sets(&path);
        let (_, g) = frontend::elaborate(Input::Path(&path), &Request { sets: &sets, model: None });
        let mut g = g.unwrap();
        for p in passes::pipeline() {
            g = p.run(g).unwrap_or_else(|d| panic!("{}: {}", p.name(), d.message));
        }
        // As `tnc compile --target sm90` schedules them (with the static 48 KB of shared memory).
        let s = tnc_compiler::pipeline::scheduled_with(&g, &schedule::ScheduleOptions::gpu()).unwrap();
        let dedup = backend::dedup_kernels(&s.kernels).unwrap();
        let (b, n) = (2i64, 7i64);
        let mut args: Vec<i64> = s.sizes.iter().map(|x| if x == "B" { b } else { n }).collect();
        assert!(s.sizes.iter().all(|x| x == "B" || x == "N"), "{:?}", s.sizes);
        args.extend([7, 3, 1]);
        let value_of = |name: &str| match name {
            "B" => Some(b),
            "N" => Some(n),
            _ => None,
        };
        let mut memory: Vec<Vec<u8>> =
            s.buffers.iter().map(|x| vec![0u8; x.bytes.eval(&value_of).unwrap().max(0) as usize]).collect();
        for &bi in &s.inputs {
            let tokens = s.buffers[bi].name.as_deref() == Some("tokens");
            let count = memory[bi].len() / 4;
            memory[bi] = if tokens { bytes(&fill(Elem::I32, count, 3)) } else { bytes(&fill(Elem::F32, count, 3)) };
        }
        for (j, &bi) in s.params.iter().enumerate() {
            let count = memory[bi].len() / 4;
            memory[bi] = bytes(&fill(Elem::F32, count, 100 + j as u64));
        }
        let mut cases = Cases { dir: dir.clone(), set: model.clone(), prefill: false, cases: vec![] };
        for step in &s.steps {
            let k = &s.kernels[step.kernel];
            let inputs: Vec<exec::Buffer> =
                k.buffers.iter().zip(&step.buffers).map(|(d, &g)| typed(&memory[g], d.elem)).collect();
            // The step's launch arguments follow the sizes and scalars.
            let step_args: Vec<i64> = args.iter().chain(&step.args).copied().collect();
            let want = cases.add(k, &dedup.names[&k.name], &inputs, &step_args);
            for (w, &g) in want.iter().zip(&step.buffers) {
                let mut v = bytes(w);
                v.resize(memory[g].len(), 0);
                memory[g] = v;
            }
        }
        cases.finish(backend::emit_ptx(&dedup.kernels, &target).unwrap());
    }
}
