//! The CUDA executor on a hand-written bundle: PTX text written by hand stands in for the
//! back end's `kernels.ptx`. Without a driver (this machine, CI) the executor and
//! `tnc-run --device cuda` must fail cleanly; with one (a GPU machine), the kernels run
//! end to end and are compared with the same computation on the host.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tnc_runtime::bundle::BundleError;
use tnc_runtime::cuda::driver_present;
use tnc_runtime::manifest::*;
use tnc_runtime::{Bundle, CudaDevice, ExecError, Executor, Tensor, NO_DRIVER};

/// `k_add`: `y[i] = x[i] + w[i % 3]` over `B*N`; `k_rowsum`: `s[r] = Σ_j y[r*N + j]` over
/// `B` (reads `N` from `sizes`); `k_gradw`: `gw[k] = Σ_{i ≡ k (3), i < B*N} x[i]` over 3;
/// `k_meta`: `m[i] = float(sizes[2 + i])` over 2 (the scalars after the sizes).
/// Each follows the calling convention: `(u64 buffers, u64 sizes, s64 begin, s64 end)`,
/// one thread per iteration.
const PTX: &str = r#"
.version 7.0
.target sm_80
.address_size 64

.visible .entry k_add(.param .u64 p_buffers, .param .u64 p_sizes, .param .s64 p_begin, .param .s64 p_end)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<16>;
    .reg .f32 %f<4>;
    ld.param.u64 %rd1, [p_buffers];
    ld.param.s64 %rd2, [p_begin];
    ld.param.s64 %rd3, [p_end];
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mul.wide.u32 %rd4, %r1, %r2;
    cvt.u64.u32 %rd5, %r3;
    add.s64 %rd4, %rd4, %rd5;
    add.s64 %rd4, %rd4, %rd2;
    setp.ge.s64 %p1, %rd4, %rd3;
    @%p1 bra ADD_DONE;
    cvta.to.global.u64 %rd1, %rd1;
    ld.global.u64 %rd6, [%rd1];
    ld.global.u64 %rd7, [%rd1+8];
    ld.global.u64 %rd8, [%rd1+16];
    shl.b64 %rd9, %rd4, 2;
    add.s64 %rd10, %rd6, %rd9;
    ld.global.f32 %f1, [%rd10];
    rem.s64 %rd11, %rd4, 3;
    shl.b64 %rd11, %rd11, 2;
    add.s64 %rd12, %rd7, %rd11;
    ld.global.f32 %f2, [%rd12];
    add.f32 %f3, %f1, %f2;
    add.s64 %rd13, %rd8, %rd9;
    st.global.f32 [%rd13], %f3;
ADD_DONE:
    ret;
}

.visible .entry k_rowsum(.param .u64 p_buffers, .param .u64 p_sizes, .param .s64 p_begin, .param .s64 p_end)
{
    .reg .pred %p<3>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<16>;
    .reg .f32 %f<4>;
    ld.param.u64 %rd1, [p_buffers];
    ld.param.u64 %rd2, [p_sizes];
    ld.param.s64 %rd3, [p_begin];
    ld.param.s64 %rd4, [p_end];
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mul.wide.u32 %rd5, %r1, %r2;
    cvt.u64.u32 %rd6, %r3;
    add.s64 %rd5, %rd5, %rd6;
    add.s64 %rd5, %rd5, %rd3;
    setp.ge.s64 %p1, %rd5, %rd4;
    @%p1 bra ROW_DONE;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    ld.global.u64 %rd6, [%rd1];
    ld.global.u64 %rd7, [%rd1+8];
    ld.global.s64 %rd8, [%rd2+8];
    mul.lo.s64 %rd9, %rd5, %rd8;
    shl.b64 %rd9, %rd9, 2;
    add.s64 %rd9, %rd6, %rd9;
    mov.f32 %f1, 0f00000000;
    mov.u64 %rd10, 0;
ROW_LOOP:
    setp.ge.s64 %p2, %rd10, %rd8;
    @%p2 bra ROW_END;
    ld.global.f32 %f2, [%rd9];
    add.f32 %f1, %f1, %f2;
    add.s64 %rd9, %rd9, 4;
    add.s64 %rd10, %rd10, 1;
    bra ROW_LOOP;
ROW_END:
    shl.b64 %rd11, %rd5, 2;
    add.s64 %rd11, %rd7, %rd11;
    st.global.f32 [%rd11], %f1;
ROW_DONE:
    ret;
}

.visible .entry k_gradw(.param .u64 p_buffers, .param .u64 p_sizes, .param .s64 p_begin, .param .s64 p_end)
{
    .reg .pred %p<3>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<16>;
    .reg .f32 %f<4>;
    ld.param.u64 %rd1, [p_buffers];
    ld.param.u64 %rd2, [p_sizes];
    ld.param.s64 %rd3, [p_begin];
    ld.param.s64 %rd4, [p_end];
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mul.wide.u32 %rd5, %r1, %r2;
    cvt.u64.u32 %rd6, %r3;
    add.s64 %rd5, %rd5, %rd6;
    add.s64 %rd5, %rd5, %rd3;
    setp.ge.s64 %p1, %rd5, %rd4;
    @%p1 bra GW_DONE;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    ld.global.u64 %rd6, [%rd1];
    ld.global.u64 %rd7, [%rd1+8];
    ld.global.s64 %rd8, [%rd2];
    ld.global.s64 %rd9, [%rd2+8];
    mul.lo.s64 %rd8, %rd8, %rd9;
    mov.f32 %f1, 0f00000000;
    mov.u64 %rd10, %rd5;
GW_LOOP:
    setp.ge.s64 %p2, %rd10, %rd8;
    @%p2 bra GW_END;
    shl.b64 %rd11, %rd10, 2;
    add.s64 %rd11, %rd6, %rd11;
    ld.global.f32 %f2, [%rd11];
    add.f32 %f1, %f1, %f2;
    add.s64 %rd10, %rd10, 3;
    bra GW_LOOP;
GW_END:
    shl.b64 %rd12, %rd5, 2;
    add.s64 %rd12, %rd7, %rd12;
    st.global.f32 [%rd12], %f1;
GW_DONE:
    ret;
}

.visible .entry k_meta(.param .u64 p_buffers, .param .u64 p_sizes, .param .s64 p_begin, .param .s64 p_end)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<16>;
    .reg .f32 %f<2>;
    ld.param.u64 %rd1, [p_buffers];
    ld.param.u64 %rd2, [p_sizes];
    ld.param.s64 %rd3, [p_begin];
    ld.param.s64 %rd4, [p_end];
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mul.wide.u32 %rd5, %r1, %r2;
    cvt.u64.u32 %rd6, %r3;
    add.s64 %rd5, %rd5, %rd6;
    add.s64 %rd5, %rd5, %rd3;
    setp.ge.s64 %p1, %rd5, %rd4;
    @%p1 bra META_DONE;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    ld.global.u64 %rd6, [%rd1];
    shl.b64 %rd7, %rd5, 3;
    add.s64 %rd7, %rd2, %rd7;
    ld.global.s64 %rd8, [%rd7+16];
    cvt.rn.f32.s64 %f1, %rd8;
    shl.b64 %rd9, %rd5, 2;
    add.s64 %rd9, %rd6, %rd9;
    st.global.f32 [%rd9], %f1;
META_DONE:
    ret;
}
"#;

fn sym(s: &str) -> Atom {
    Atom::Sym(s.into())
}

fn kernel(name: &str, slots: &[(DType, Access)], extent: Poly, gpu: Option<GpuLaunch>) -> KernelEntry {
    KernelEntry {
        name: name.into(),
        symbol: format!("k_{name}"),
        buffers: slots.iter().map(|&(elem, access)| KernelBuffer { elem, access }).collect(),
        extent,
        library: false,
        gemm: None,
        args: vec![],
        gpu,
    }
}

fn buffer(bytes: Poly, role: BufferRole, name: Option<&str>) -> BufferEntry {
    BufferEntry { bytes, role, name: name.map(String::from) }
}

fn manifest() -> Manifest {
    use Access::*;
    use DType::F32;
    let bn = Poly::term(1, vec![sym("B"), sym("N")]);
    let bn4 = Poly::term(4, vec![sym("B"), sym("N")]);
    let one_block = GpuLaunch { block: [32, 1, 1], grid: [1.into(), 1.into(), 1.into()], shared_bytes: 0 };
    Manifest {
        format_version: FORMAT_VERSION,
        tnc_version: "0.1.0".into(),
        model: "toy_cuda".into(),
        target: Target { name: "sm80".into(), kind: TargetKind::Cuda, arch: None, cpu_features: vec![] },
        sizes: vec!["B".into(), "N".into()],
        scalars: vec!["seed".into(), "step".into()],
        kernels: vec![
            kernel("add", &[(F32, Read), (F32, Read), (F32, Write)], bn, None),
            kernel("rowsum", &[(F32, Read), (F32, Write)], Poly::sym("B"), None),
            kernel("gradw", &[(F32, Read), (F32, Write)], Poly::constant(3), Some(one_block)),
            kernel("meta", &[(F32, Write)], Poly::constant(2), None),
        ],
        buffers: vec![
            buffer(bn4.clone(), BufferRole::Input, Some("x")),
            buffer(Poly::constant(12), BufferRole::Param, Some("w")),
            buffer(bn4, BufferRole::Output, Some("y")),
            buffer(Poly::term(4, vec![sym("B")]), BufferRole::Output, Some("s")),
            buffer(Poly::constant(12), BufferRole::Grad, Some("w")),
            buffer(Poly::constant(8), BufferRole::Output, Some("meta")),
        ],
        params: vec![ParamEntry {
            name: "w".into(),
            shape: vec![3],
            dtype: F32,
            trainable: true,
            attrs: vec![],
            init: InitSpec::Normal { mean: 1.0, std: 0.5 },
            seed: None,
            buffer: 1,
        }],
        inputs: vec![IoEntry {
            name: "x".into(),
            dtype: F32,
            shape: vec![Poly::sym("B"), Poly::sym("N")],
            buffer: 0,
            entry: "forward".into(),
            bounds: vec![],
        }],
        outputs: vec![
            IoEntry {
                name: "y".into(),
                dtype: F32,
                shape: vec![Poly::sym("B"), Poly::sym("N")],
                buffer: 2,
                entry: "forward".into(),
                bounds: vec![],
            },
            IoEntry {
                name: "s".into(),
                dtype: F32,
                shape: vec![Poly::sym("B")],
                buffer: 3,
                entry: "forward".into(),
                bounds: vec![],
            },
            IoEntry {
                name: "meta".into(),
                dtype: F32,
                shape: vec![Poly::constant(2)],
                buffer: 5,
                entry: "forward".into(),
                bounds: vec![],
            },
        ],
        entry_points: BTreeMap::from([
            (
                "forward".into(),
                vec![
                    Step { kernel: 0, buffers: vec![0, 1, 2], args: vec![] },
                    Step { kernel: 1, buffers: vec![2, 3], args: vec![] },
                    Step { kernel: 3, buffers: vec![5], args: vec![] },
                ],
            ),
            ("backward".into(), vec![Step { kernel: 2, buffers: vec![0, 4], args: vec![] }]),
            ("decode".into(), vec![]),
        ]),
        files: BTreeMap::new(),
        model_sha256: None,
    }
}

fn write_bundle(dir: &Path) -> Bundle {
    manifest().write_bundle(dir, &[(CUDA_KERNELS_FILE, PTX.as_bytes())]).unwrap();
    Bundle::load(dir).unwrap()
}

/// `tnc-run`, or `TNC_RUN_BIN` when the test binary runs elsewhere than it was built.
fn tnc_run() -> PathBuf {
    std::env::var_os("TNC_RUN_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_tnc-run").into())
}

fn x_values(b: usize, n: usize) -> Vec<f32> {
    (0..b * n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.25).collect()
}

fn write_inputs(path: &Path, b: usize, n: usize) {
    let bytes: Vec<u8> = x_values(b, n).iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![b, n], &bytes).unwrap();
    safetensors::serialize_to_file([("x", view)], None, path).unwrap();
}

fn read_f32(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect()
}

/// The host's answer for `x_values(b, n)` and `w`: (y, s, gw).
fn expected(b: usize, n: usize, w: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = x_values(b, n);
    let y: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + w[i % 3]).collect();
    let s: Vec<f32> = (0..b).map(|r| y[r * n..(r + 1) * n].iter().sum()).collect();
    let gw: Vec<f32> = (0..3).map(|k| x.iter().skip(k).step_by(3).sum()).collect();
    (y, s, gw)
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
}

#[test]
fn executors_refuse_the_other_kind() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(dir.path());
    let e = Executor::cpu(&bundle, 1).err().expect("the CPU executor refuses a CUDA bundle");
    assert!(matches!(e, ExecError::Bundle(BundleError::TargetKind { .. })), "{e:?}");

    let mut m = manifest();
    m.target = Target { name: "native".into(), kind: TargetKind::Cpu, arch: None, cpu_features: vec![] };
    m.entry_points.clear();
    m.kernels.clear();
    let cpu_dir = tempfile::tempdir().unwrap();
    m.write_bundle(cpu_dir.path(), &[]).unwrap();
    let cpu = Bundle::load(cpu_dir.path()).unwrap();
    let e = Executor::cuda(&cpu).err().expect("the CUDA executor refuses a CPU bundle");
    assert!(matches!(e, ExecError::Bundle(BundleError::TargetKind { .. })), "{e:?}");
    assert!(e.to_string().contains("the cuda executor cannot run it"), "{e}");
}

#[test]
fn without_a_driver_new_is_a_clean_error() {
    if driver_present() {
        eprintln!("skipped: a CUDA driver is present (see hand_written_ptx_end_to_end)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(dir.path());
    let e = Executor::cuda(&bundle).err().expect("no driver, no executor");
    assert!(matches!(e, ExecError::NoDriver), "{e:?}");
    assert_eq!(e.to_string(), NO_DRIVER);
    assert_eq!(NO_DRIVER, "no CUDA driver found (libcuda.so could not be loaded)");
}

#[test]
fn tnc_run_without_a_driver_exits_1() {
    if driver_present() {
        eprintln!("skipped: a CUDA driver is present");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bdir = dir.path().join("toy.bundle");
    write_bundle(&bdir);
    let inputs = dir.path().join("in.safetensors");
    write_inputs(&inputs, 2, 5);
    let out = std::process::Command::new(tnc_run())
        .arg(&bdir)
        .args(["--device", "cuda", "--inputs"])
        .arg(&inputs)
        .args(["--seed", "3", "--out"])
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: no CUDA driver found (libcuda.so could not be loaded)"), "{stderr}");
    let out = std::process::Command::new(tnc_run())
        .args(["bench"])
        .arg(&bdir)
        .args(["--device", "cuda", "--batch", "2", "--seq", "8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: no CUDA driver found"), "{stderr}");
    // Bad usage is status 2.
    let out = std::process::Command::new(tnc_run()).arg(&bdir).args(["--device", "tpu"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Runs only where a driver and a device exist: every kernel, sizes changing between
/// runs, scalars, the debug NaN fill, reruns and timing, and `tnc-run` end to end.
#[test]
fn hand_written_ptx_end_to_end() {
    if !driver_present() {
        eprintln!("skipped: no CUDA driver on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(&dir.path().join("toy.bundle"));
    let mut ex = match Executor::cuda(&bundle) {
        Ok(ex) => ex,
        Err(ExecError::Cuda { message, .. }) if message.contains("no device") => {
            eprintln!("skipped: {message}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    eprintln!("device: {}", ex.describe_device());
    let x = Tensor::f32(vec![2, 5], x_values(2, 5));
    assert!(matches!(ex.forward(&[("x", &x)]), Err(ExecError::Order(_))), "parameters first");
    ex.set_params_from_seed(11).unwrap();
    let w = ex.param("w").unwrap().as_f32().unwrap().to_vec();
    let host_w = tnc_runtime::init::init_values_f32(&InitSpec::Normal { mean: 1.0, std: 0.5 }, &[3], "w", 11).unwrap();
    assert_eq!(w, host_w, "parameters are initialized on the host exactly");

    ex.set_scalar("seed", 42).unwrap();
    ex.set_scalar("step", -7).unwrap();
    for (b, n, debug) in [(2usize, 5usize, false), (3, 300, true), (1, 1000, false), (2, 5, true)] {
        ex.set_debug_nan(debug);
        let x = Tensor::f32(vec![b, n], x_values(b, n));
        ex.forward(&[("x", &x)]).unwrap();
        let (y, s, gw) = expected(b, n, &w);
        assert!(close(ex.output("y").unwrap().as_f32().unwrap(), &y), "y at B={b} N={n}");
        assert_eq!(ex.output("y").unwrap().shape, vec![b, n]);
        assert!(close(ex.output("s").unwrap().as_f32().unwrap(), &s), "s at B={b} N={n}");
        assert_eq!(ex.output("meta").unwrap().as_f32().unwrap(), &[42.0, -7.0]);
        ex.backward(&[]).unwrap();
        let g = ex.gradients().unwrap();
        assert!(close(g["w"].as_f32().unwrap(), &gw), "gw at B={b} N={n}: {:?} vs {gw:?}", g["w"]);
        // Reruns reuse the uploaded inputs.
        let ms = ex.time_ms(&["forward", "backward"]).unwrap();
        assert!(ms >= 0.0);
        assert!(close(ex.output("s").unwrap().as_f32().unwrap(), &s));
    }
    // A different parameter file round-trips.
    let params = dir.path().join("params.safetensors");
    ex.save_params(&params).unwrap();
    let mut ex2 = Executor::cuda(&bundle).unwrap();
    ex2.set_params_from_file(&params).unwrap();
    assert_eq!(ex2.param("w").unwrap().as_f32().unwrap(), w.as_slice());
    drop(ex2);
    // Wrong input shapes are errors before anything launches.
    let bad = Tensor::f32(vec![10], vec![0.0; 10]);
    assert!(matches!(ex.forward(&[("x", &bad)]), Err(ExecError::Input { .. })));

    // tnc-run end to end.
    let inputs = dir.path().join("in.safetensors");
    write_inputs(&inputs, 4, 33);
    let out_path = dir.path().join("out.safetensors");
    let out = std::process::Command::new(tnc_run())
        .arg(dir.path().join("toy.bundle"))
        .args(["--device", "cuda", "--inputs"])
        .arg(&inputs)
        .args(["--seed", "11", "--grad", "--debug-nan", "--out"])
        .arg(&out_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let got = read_f32(&out_path);
    let (y, s, gw) = expected(4, 33, &w);
    assert!(close(&got["y"], &y));
    assert!(close(&got["s"], &s));
    assert!(close(&got["grad.w"], &gw));
    let out = std::process::Command::new(tnc_run())
        .arg("bench")
        .arg(dir.path().join("toy.bundle"))
        .args(["--device", "cuda", "--batch", "4", "--seq", "4096", "--iters", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("BENCH_JSON"), "{stdout}");
    eprintln!("{stdout}");
}

#[test]
fn executors_and_devices_are_send() {
    fn send<T: Send>() {}
    send::<CudaDevice>();
    send::<Executor>();
}
