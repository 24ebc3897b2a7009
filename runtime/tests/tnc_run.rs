//! `tnc-run` on the CPU: a hand-written bundle (C kernels built with `cc -shared`) run
//! end to end from safetensors in to safetensors out, `bench`, and its error statuses.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tnc_runtime::manifest::*;

const KERNELS_C: &str = r#"
#include <stdint.h>
/* y[i] = x[i] * w[i % 2], i over B*N */
void k_mul(void **b, const int64_t *s, int64_t begin, int64_t end) {
    const float *x = b[0], *w = b[1];
    float *y = b[2];
    for (int64_t i = begin; i < end; i++) y[i] = x[i] * w[i % 2];
}
/* gw[k] = sum_{i % 2 == k} x[i] */
void k_gradw(void **b, const int64_t *s, int64_t begin, int64_t end) {
    const float *x = b[0];
    float *gw = b[1];
    for (int64_t k = begin; k < end; k++) {
        float acc = 0.0f;
        for (int64_t i = k; i < s[0] * s[1]; i += 2) acc += x[i];
        gw[k] = acc;
    }
}
"#;

fn bundle(dir: &Path) {
    let src = dir.join("k.c");
    let so = dir.join("k.so");
    std::fs::write(&src, KERNELS_C).unwrap();
    let st = Command::new("cc").args(["-shared", "-fPIC", "-O1", "-o"]).arg(&so).arg(&src).status().unwrap();
    assert!(st.success());
    let so_bytes = std::fs::read(&so).unwrap();
    let bn = Poly::term(1, vec![Atom::Sym("B".into()), Atom::Sym("N".into())]);
    let bn4 = Poly::term(4, vec![Atom::Sym("B".into()), Atom::Sym("N".into())]);
    let slot = |access| KernelBuffer { elem: DType::F32, access };
    let m = Manifest {
        format_version: FORMAT_VERSION,
        tnc_version: "0.1.0".into(),
        model: "mul".into(),
        target: Target { name: "native".into(), kind: TargetKind::Cpu, arch: None, cpu_features: vec![] },
        sizes: vec!["B".into(), "N".into()],
        scalars: vec![],
        kernels: vec![
            KernelEntry {
                name: "mul".into(),
                symbol: "k_mul".into(),
                buffers: vec![slot(Access::Read), slot(Access::Read), slot(Access::Write)],
                extent: bn,
                library: false,
                gemm: None,
                args: vec![],
                gpu: None,
            },
            KernelEntry {
                name: "gradw".into(),
                symbol: "k_gradw".into(),
                buffers: vec![slot(Access::Read), slot(Access::Write)],
                extent: Poly::constant(2),
                library: false,
                gemm: None,
                args: vec![],
                gpu: None,
            },
        ],
        buffers: vec![
            BufferEntry { bytes: bn4.clone(), role: BufferRole::Input, name: Some("x".into()) },
            BufferEntry { bytes: Poly::constant(8), role: BufferRole::Param, name: Some("w".into()) },
            BufferEntry { bytes: bn4, role: BufferRole::Output, name: Some("y".into()) },
            BufferEntry { bytes: Poly::constant(8), role: BufferRole::Grad, name: Some("w".into()) },
        ],
        params: vec![ParamEntry {
            name: "w".into(),
            shape: vec![2],
            dtype: DType::F32,
            trainable: true,
            attrs: vec![],
            init: InitSpec::Constant(3.0),
            seed: None,
            buffer: 1,
        }],
        inputs: vec![IoEntry {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Poly::sym("B"), Poly::sym("N")],
            buffer: 0,
            entry: "forward".into(),
            bounds: vec![],
        }],
        outputs: vec![
            IoEntry {
                name: "y".into(),
                dtype: DType::F32,
                shape: vec![Poly::sym("B"), Poly::sym("N")],
                buffer: 2,
                entry: "forward".into(),
                bounds: vec![],
            },
            // A gradient that is also declared as an output is written once.
            IoEntry {
                name: "grad.w".into(),
                dtype: DType::F32,
                shape: vec![Poly::constant(2)],
                buffer: 3,
                entry: "backward".into(),
                bounds: vec![],
            },
        ],
        entry_points: BTreeMap::from([
            ("forward".into(), vec![Step { kernel: 0, buffers: vec![0, 1, 2], args: vec![] }]),
            ("backward".into(), vec![Step { kernel: 1, buffers: vec![0, 3], args: vec![] }]),
        ]),
        files: BTreeMap::new(),
        model_sha256: None,
    };
    m.write_bundle(&dir.join("b"), &[(CPU_KERNELS_FILE, &so_bytes)]).unwrap();
}

fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (n.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn tnc_run(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tnc-run")).args(args).current_dir(dir).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn run_and_bench_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    bundle(dir);
    let x: Vec<f32> = (0..6).map(|i| i as f32 - 1.5).collect();
    write_f32(&dir.join("in.safetensors"), &[("x", vec![2, 3], x.clone()), ("unused", vec![1], vec![0.0])]);
    let (code, stdout, stderr) = tnc_run(
        &["b", "--device", "cpu", "--inputs", "in.safetensors", "--seed", "1", "--out", "out.safetensors", "--grad"],
        dir,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("ignoring `unused`"), "{stderr}");
    assert!(stdout.contains("wrote 2 tensors"), "{stdout}");
    let bytes = std::fs::read(dir.join("out.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let vals = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    assert_eq!(vals("y"), x.iter().map(|v| v * 3.0).collect::<Vec<_>>());
    assert_eq!(vals("grad.w"), vec![x[0] + x[2] + x[4], x[1] + x[3] + x[5]]);
    assert_eq!(st.tensor("y").unwrap().shape(), &[2, 3]);

    // Parameters from a file instead of the seed.
    write_f32(&dir.join("p.safetensors"), &[("w", vec![2], vec![2.0, -1.0])]);
    let (code, _, stderr) = tnc_run(
        &["b", "--device", "cpu", "--inputs", "in.safetensors", "--params", "p.safetensors", "--out", "o2.safetensors"],
        dir,
    );
    assert_eq!(code, 0, "{stderr}");

    let (code, stdout, stderr) = tnc_run(
        &["bench", "b", "--device", "cpu", "--batch", "3", "--seq", "1000", "--iters", "3", "--threads", "2"],
        dir,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("BENCH_JSON {\"impl\": \"tnc\""), "{stdout}");
    assert!(stdout.contains("\"sizes\": {\"B\": 3, \"N\": 1000}"), "{stdout}");

    // Errors: status 1 and a message; bad usage: status 2.
    let (code, _, stderr) =
        tnc_run(&["b", "--device", "cpu", "--inputs", "missing.safetensors", "--out", "o.safetensors"], dir);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("error: cannot read missing.safetensors"), "{stderr}");
    write_f32(&dir.join("bad.safetensors"), &[("x", vec![6], x)]);
    let (code, _, stderr) =
        tnc_run(&["b", "--device", "cpu", "--inputs", "bad.safetensors", "--out", "o.safetensors"], dir);
    assert_eq!(code, 1);
    assert!(stderr.contains("input `x`"), "{stderr}");
    let (code, _, _) = tnc_run(&["b", "--device", "cpu"], dir);
    assert_eq!(code, 2);
    let (code, _, _) = tnc_run(&["bench", "b", "--batch", "0", "--seq", "1"], dir);
    assert_eq!(code, 2);
}
