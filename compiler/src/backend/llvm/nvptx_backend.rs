//! The LLVM back end for NVIDIA GPUs: kernel IR → LLVM IR + libdevice → PTX text, which
//! the driver compiles when the bundle loads. Kernels run one thread per parallel
//! iteration in blocks of [`GPU_BLOCK`](super::ptx::GPU_BLOCK), or as block kernels with
//! their own thread count and shared memory; the manifest carries each launch's shape.

use crate::backend::contract::{timed, Backend, Emit, KernelPass, Written};
use crate::backend::target::{GpuGemm, GpuTarget};
use crate::bundle::TargetInfo;
use crate::kernel::Kernel;
use crate::schedule::{Schedule, ScheduleOptions};
use tnc_bundle::manifest::{GpuLaunch, Poly, TargetKind};
use tnc_bundle::Manifest;

pub struct LlvmNvptx {
    gpu: GpuTarget,
}

impl LlvmNvptx {
    pub fn new(gpu: GpuTarget) -> LlvmNvptx {
        LlvmNvptx { gpu }
    }
}

/// `f` on every kernel but those over flat elements ([`Schedule::flat`]: split
/// reductions' combiners, the optimizer's), coalesced as they are.
fn each_but_flat(s: &mut Schedule, f: fn(&Kernel) -> Kernel) {
    for (i, k) in s.kernels.iter_mut().enumerate() {
        if !s.flat.contains(&i) {
            *k = f(k);
        }
    }
}

impl Backend for LlvmNvptx {
    /// Block kernels, with shared memory up to the target's limit per block.
    fn schedule_options(&self) -> ScheduleOptions {
        ScheduleOptions { shared_limit: self.gpu.max_shared_bytes(), ..ScheduleOptions::gpu() }
    }

    /// Library GEMM nodes become tiled block kernels (`kernel/gemm_tiles.rs`, on tensor
    /// cores for 16-bit operands) — with `--gemm cublas` those cuBLAS cannot express —,
    /// then row kernels blocks whose threads share each row (`kernel/blocks.rs`).
    fn kernel_passes(&self) -> Vec<KernelPass> {
        use crate::kernel::{blocks, gemm_tiles};
        let tile_gemm = match self.gpu.gemm {
            GpuGemm::Tiles => KernelPass { name: "tile_gemm", run: |s| each_but_flat(s, gemm_tiles::tile_gemm) },
            GpuGemm::Cublas => {
                KernelPass { name: "tile_gemm", run: |s| each_but_flat(s, gemm_tiles::tile_gemm_unless_cublas) }
            }
        };
        vec![tile_gemm, KernelPass { name: "coalesce_rows", run: |s| each_but_flat(s, blocks::coalesce_rows) }]
    }

    fn write(&self, kernels: &[Kernel], emit: Emit) -> Result<Written, String> {
        let mut stages = Vec::new();
        let ptx = timed(&mut stages, "llvm (nvptx)", || super::ptx::emit_ptx(kernels, &self.gpu))?;
        let mut extras = Vec::new();
        if emit.llvm {
            extras.push(("ll", super::ptx::emit_nvptx_ir(kernels, &self.gpu, true)?.into_bytes()));
        }
        if emit.asm {
            extras.push(("ptx", ptx.clone().into_bytes()));
        }
        // The emulated GPU device runs the kernel IR the PTX was written from.
        let kernel_ir = serde_json::to_vec(kernels).map_err(|e| format!("cannot serialize the kernels: {e}"))?;
        Ok(Written {
            info: TargetInfo { name: self.gpu.name.clone(), kind: TargetKind::Cuda, cpu_features: Vec::new() },
            files: vec![
                (tnc_bundle::manifest::CUDA_KERNELS_FILE, ptx.into_bytes()),
                (tnc_bundle::manifest::KERNEL_IR_FILE, kernel_ir),
            ],
            extras,
            stages,
        })
    }

    /// Each generated kernel's launch shape: a block kernel runs one block of its threads per
    /// iteration, with the dynamic shared memory its arrays need beyond the static 48 KB
    /// (below it they are static, in the PTX); any other kernel one thread per iteration,
    /// grid = ceil(range / block).
    fn complete_manifest(&self, manifest: &mut Manifest, kernels: &[Kernel]) -> Result<(), String> {
        let one = || Poly::constant(1);
        for (k, kernel) in manifest.kernels.iter_mut().zip(kernels) {
            // A library node left for cuBLAS (`--gemm cublas`) is no launch of ours.
            if k.library {
                continue;
            }
            k.gpu = Some(match kernel.threads {
                Some(t) => GpuLaunch {
                    block: [t, 1, 1],
                    grid: [k.extent.clone(), one(), one()],
                    shared_bytes: u32::try_from(kernel.dynamic_shared_bytes())
                        .map_err(|_| format!("kernel `{}` declares too much shared memory", kernel.name))?,
                },
                None => {
                    let block = super::ptx::GPU_BLOCK;
                    GpuLaunch {
                        block: [block, 1, 1],
                        grid: [Poly::ceil_div(k.extent.clone(), block as i64), one(), one()],
                        shared_bytes: 0,
                    }
                }
            });
        }
        Ok(())
    }
}
