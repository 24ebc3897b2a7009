//! `--device`: where a compiled bundle runs, and the runtime executor for it. Every
//! command that runs a bundle (`tnc run`, `verify`, `train`, `eval`, `ablate`) opens its
//! executor here, so they all accept the same devices.

use crate::{fail, Failure};
use tnc_grammar::Diagnostic;
use tnc_runtime::{Bundle, Executor};

/// Where a bundle runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceArg {
    /// CPU threads (bundles for `native`, `x86-64-v3`, `x86-64-v4`).
    #[default]
    Cpu,
    /// An NVIDIA GPU through the CUDA driver (bundles for `sm80` … `sm90a`).
    Cuda,
    /// A GPU bundle's kernels run on the CPU with GPU semantics (threads in random order,
    /// shared memory checked for races): slow, for testing GPU schedules without a GPU.
    Emulated,
}

impl DeviceArg {
    /// Whether the device runs GPU (CUDA) bundles.
    pub fn runs_gpu_bundles(self) -> bool {
        self != DeviceArg::Cpu
    }

    /// The device a bundle for `target` runs on by default.
    pub fn for_target(target: &str) -> DeviceArg {
        if tnc_compiler::driver::is_gpu(target) {
            DeviceArg::Cuda
        } else {
            DeviceArg::Cpu
        }
    }

    /// The target compiled for when none is given: the host CPU, or sm80 for a GPU.
    pub fn default_target(self) -> &'static str {
        if self.runs_gpu_bundles() {
            "sm80"
        } else {
            "native"
        }
    }

    /// An error, before anything is compiled, when this device cannot run here (CUDA
    /// without a driver) or cannot run bundles for `target`.
    pub fn check(self, target: &str) -> Result<(), Failure> {
        let gpu = tnc_compiler::driver::is_gpu(target);
        if gpu != self.runs_gpu_bundles() {
            let d = match self {
                DeviceArg::Cpu => Diagnostic::error(format!("`--device cpu` cannot run a bundle for {target}"))
                    .with_hint("pass `--device cuda` (or `--device emulated`), or a CPU target"),
                _ => Diagnostic::error(format!("`--device {}` runs GPU bundles, not ones for {target}", self.name()))
                    .with_hint("use a bundle compiled for a GPU target (`--target sm80`), or `--device cpu`"),
            };
            return Err(Failure::usage(d));
        }
        if self == DeviceArg::Cuda && !cuda_driver_present() {
            return Err(fail(format!(
                "{} (`--device emulated` runs GPU schedules on the CPU)",
                tnc_runtime::NO_DRIVER
            )));
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
            DeviceArg::Emulated => "emulated",
        }
    }
}

fn cuda_driver_present() -> bool {
    tnc_runtime::cuda::driver_present()
}

/// The bundle in `dir`, loaded and checked.
pub fn load(dir: &std::path::Path) -> Result<Bundle, Failure> {
    use tnc_runtime::BundleError::{Io, NotABundle, Parse};
    Bundle::load(dir).map_err(|e| match e {
        // These name the path already.
        Io { .. } | NotABundle { .. } | Parse { .. } => fail(e.to_string()),
        _ => fail(format!("{}: {e}", dir.display())),
    })
}

/// An executor for `bundle` on `device` (`threads` for the CPU).
pub fn open(bundle: &Bundle, device: DeviceArg, threads: usize) -> Result<Executor, Failure> {
    let exec = match device {
        DeviceArg::Cpu => Executor::cpu(bundle, threads),
        DeviceArg::Cuda => Executor::cuda(bundle),
        DeviceArg::Emulated => {
            crate::emulated_gpu::EmulatedGpu::new(bundle).and_then(|d| Executor::on(bundle, Box::new(d)))
        }
    };
    exec.map_err(|e| fail(format!("{}: {e}", bundle.dir.display())))
}
