//! The emulated GPU: a [`Device`] that runs a CUDA bundle's kernels — the kernel IR its
//! PTX was written from (`kernel-ir.json`) — in the reference executor, block kernels in
//! the GPU-semantics executor (`gpu_exec.rs`: threads in a random order, shared memory
//! checked for races, out-of-bounds and uninitialized reads). It trains and evaluates
//! small models on GPU schedules on machines without a GPU, so CI tests them; it is
//! slow (an interpreter) and that is fine.
//!
//! It lives in the compiler crate because the kernel IR and its executor do: the runtime
//! never depends on the compiler, so `tnc-run` has no emulated device.

use super::exec::{self, Buffer};
use super::ir::{Access, Kernel};
use crate::schedule::run::{to_bytes, to_typed};
use std::collections::HashMap;
use tnc_runtime::device::{Device, Launch};
use tnc_runtime::manifest::{TargetKind, KERNEL_IR_FILE};
use tnc_runtime::{Bundle, BundleError, ExecError};

/// A GPU emulated on the host. See the module documentation.
pub struct EmulatedGpu {
    target: String,
    kernels: Vec<Kernel>,
    /// Each buffer's bytes (little-endian), as long as the buffer is.
    memory: Vec<Vec<u8>>,
    entries: HashMap<String, Vec<Launch>>,
}

impl EmulatedGpu {
    /// An emulated GPU for a CUDA bundle: reads and checks its kernel IR.
    pub fn new(bundle: &Bundle) -> Result<EmulatedGpu, ExecError> {
        bundle.check_kind(TargetKind::Cuda)?;
        let path = bundle.path(KERNEL_IR_FILE);
        if !bundle.manifest.files.contains_key(KERNEL_IR_FILE) {
            return Err(ExecError::Unsupported(format!(
                "the bundle has no {KERNEL_IR_FILE} (it was written by an older tnc): recompile it to emulate it"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|error| ExecError::Io { path: path.clone(), error })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        // Expressions nest deeper than serde_json's default limit of 128.
        de.disable_recursion_limit();
        let kernels: Vec<Kernel> = serde::Deserialize::deserialize(&mut de).map_err(|e| {
            ExecError::Bundle(BundleError::Invalid(format!("{KERNEL_IR_FILE} is not the kernel IR of tnc: {e}")))
        })?;
        let m = &bundle.manifest;
        let matches = kernels.len() == m.kernels.len()
            && kernels.iter().zip(&m.kernels).all(|(k, e)| k.name == e.name && k.buffers.len() == e.buffers.len());
        if !matches {
            return Err(ExecError::Bundle(BundleError::Invalid(format!(
                "{KERNEL_IR_FILE} does not describe the manifest's kernels"
            ))));
        }
        Ok(EmulatedGpu {
            target: m.target.name.clone(),
            kernels,
            memory: vec![Vec::new(); m.buffers.len()],
            entries: HashMap::new(),
        })
    }
}

impl Device for EmulatedGpu {
    fn describe(&self) -> String {
        format!(
            "emulated GPU ({} kernels in the GPU-semantics executor: random thread order, race checks)",
            self.target
        )
    }

    fn resize(&mut self, buffer: usize, len: usize) -> Result<(), ExecError> {
        let m = &mut self.memory[buffer];
        if len > m.capacity() {
            // As on a GPU: a new allocation, zeroed.
            *m = vec![0; len];
        } else {
            m.resize(len, 0);
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> usize {
        self.memory.iter().map(Vec::capacity).sum()
    }

    fn upload(&mut self, buffer: usize, bytes: &[u8]) -> Result<(), ExecError> {
        let m = &mut self.memory[buffer];
        if bytes.len() > m.len() {
            return Err(ExecError::Sizes(format!("{} bytes do not fit buffer {buffer} of {}", bytes.len(), m.len())));
        }
        m[..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn download(&self, buffer: usize, len: usize) -> Result<Vec<u8>, ExecError> {
        let m = &self.memory[buffer];
        m.get(..len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ExecError::Sizes(format!("buffer {buffer} holds {} bytes, {len} were asked for", m.len())))
    }

    fn fill(&mut self, buffer: usize, byte: u8) -> Result<(), ExecError> {
        self.memory[buffer].fill(byte);
        Ok(())
    }

    fn bind(&mut self, entry: &str, launches: Vec<Launch>, _sizes: &HashMap<&str, i64>) -> Result<(), ExecError> {
        self.entries.insert(entry.to_string(), launches);
        Ok(())
    }

    fn launch(&mut self, entry: &str, args: &[i64]) -> Result<(), ExecError> {
        let launches = self.entries.get(entry).ok_or_else(|| ExecError::Order(format!("`{entry}` is not bound")))?;
        for l in launches {
            let k = &self.kernels[l.kernel];
            let mut views: Vec<Buffer> =
                k.buffers.iter().zip(&l.buffers).map(|(decl, &g)| to_typed(&self.memory[g], decl.elem)).collect();
            let args: Vec<i64> = args.iter().chain(&l.args).copied().collect();
            exec::run(k, &mut views, &args, 0, l.extent)
                .map_err(|message| ExecError::Fault { kernel: k.name.clone(), message })?;
            for ((view, decl), &g) in views.iter().zip(&k.buffers).zip(&l.buffers) {
                if decl.access != Access::Read {
                    let len = self.memory[g].len();
                    self.memory[g] = to_bytes(view, len);
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), ExecError> {
        Ok(())
    }
}
