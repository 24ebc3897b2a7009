//! The LLVM back end for x86-64 CPUs: kernel IR → LLVM IR → native objects, linked into
//! `kernels.so`. Library GEMM nodes emit no code: the runtime calls its GEMM library.

use crate::backend::contract::{timed, Backend, Emit, KernelPass, Written};
use crate::backend::target::CpuTarget;
use crate::bundle::TargetInfo;
use crate::kernel::Kernel;
use crate::schedule::ScheduleOptions;
use tnc_bundle::manifest::TargetKind;

pub struct LlvmNative {
    cpu: CpuTarget,
}

impl LlvmNative {
    pub fn new(cpu: CpuTarget) -> LlvmNative {
        LlvmNative { cpu }
    }
}

impl Backend for LlvmNative {
    /// Products go to the GEMM library; register blocks sized to the target's registers.
    fn schedule_options(&self) -> ScheduleOptions {
        ScheduleOptions { accumulator_floats: self.cpu.accumulator_floats(), ..ScheduleOptions::cpu() }
    }

    /// The CPU kernel passes (`backend/cpu_passes.rs`).
    fn kernel_passes(&self) -> Vec<KernelPass> {
        crate::backend::cpu_passes::cpu_kernel_passes()
    }

    fn write(&self, kernels: &[Kernel], emit: Emit) -> Result<Written, String> {
        let mut stages = Vec::new();
        let objects = timed(&mut stages, "llvm", || super::emit_objects(kernels, &self.cpu))?;
        let linked = timed(&mut stages, "link", || crate::backend::link::shared_object(&objects));
        let mut extras = Vec::new();
        if emit.llvm {
            extras.push(("ll", super::emit_llvm_ir(kernels, &self.cpu, true)?.into_bytes()));
        }
        if emit.asm {
            extras.push(("s", super::emit_asm(kernels, &self.cpu)?.into_bytes()));
        }
        // Features the runtime can check; `native` lists every host feature LLVM knows,
        // some of which no run-time check exists for (the checked ones imply them).
        let cpu_features = (self.cpu.required_features.iter())
            .filter(|f| tnc_bundle::cpu_features::host_has_feature(f).is_some())
            .cloned()
            .collect();
        Ok(Written {
            info: TargetInfo { name: self.cpu.name.clone(), kind: TargetKind::Cpu, cpu_features },
            files: vec![(tnc_bundle::manifest::CPU_KERNELS_FILE, linked?)],
            extras,
            stages,
        })
    }
}
