//! The executor: runs a bundle's entry points on any [`Device`]. Sizes, parameters,
//! optimizer state, inputs, outputs, gradients, parameter files and every error are
//! handled here, once; a device only allocates, copies and launches (`device.rs`).
//!
//! ```no_run
//! use tnc_runtime::{Bundle, Executor, Tensor};
//! let bundle = Bundle::load("model.bundle")?;
//! let mut exec = Executor::cpu(&bundle, 4)?; // or Executor::cuda(&bundle)
//! exec.set_params_from_seed(0)?;
//! let tokens = Tensor::i32(vec![1, 3], vec![5, 7, 9]);
//! exec.forward(&[("tokens", &tokens)])?;
//! let loss = exec.output("loss")?;
//! exec.backward(&[])?;
//! let grads = exec.gradients()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Entry points may run asynchronously (CUDA queues them on a stream): reading results
//! ([`Executor::output`], [`Executor::gradients`], …) or [`Executor::synchronize`] waits
//! for them and reports any kernel fault.

use crate::bundle::{Bundle, BundleError};
use crate::device::{Device, Launch};
use crate::error::ExecError;
use crate::gemm;
use crate::init::init_values_f32;
use crate::manifest::{Access, BufferRole, DType, InitSpec, Manifest, ParamEntry, Step};
use crate::tensor::Tensor;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Runs a bundle on a device. See the module documentation.
pub struct Executor {
    manifest: Manifest,
    dir: PathBuf,
    device: Box<dyn Device>,
    /// The length in bytes of every buffer on the device.
    lens: Vec<usize>,
    /// Current values of `manifest.sizes` (unset until known).
    sizes: Vec<Option<i64>>,
    /// The sizes the buffers are allocated for.
    allocated_for: Option<Vec<i64>>,
    /// Values of `manifest.scalars`.
    scalars: Vec<i64>,
    debug_nan: bool,
    params_set: bool,
    /// Entry points run since the buffers were last (re)allocated.
    ran: HashSet<String>,
    /// Entry points bound on the device for the current allocation.
    bound: HashSet<String>,
    /// Entry points whose inputs are on the device for the current allocation.
    given: HashSet<String>,
    /// Inputs whose value an earlier [`Executor::carry`] put on the device for the current
    /// sizes: a run may leave them out.
    resident: HashSet<String>,
}

impl Executor {
    /// An executor for a CPU bundle on `threads` worker threads (at least 1).
    pub fn cpu(bundle: &Bundle, threads: usize) -> Result<Executor, ExecError> {
        let device = crate::cpu::CpuDevice::new(bundle, threads)?;
        Executor::on(bundle, Box::new(device))
    }

    /// An executor for a CUDA bundle on GPU 0 (or `TNC_CUDA_DEVICE`), replaying each
    /// entry point as a CUDA graph unless `TNC_CUDA_GRAPHS=0`.
    #[cfg(feature = "cuda")]
    pub fn cuda(bundle: &Bundle) -> Result<Executor, ExecError> {
        let device = crate::cuda::CudaDevice::new(bundle, crate::cuda::graphs_from_env())?;
        Executor::on(bundle, Box::new(device))
    }

    /// An executor for `bundle` on `device` (which was made for this bundle). Allocates
    /// the parameters and the optimizer state, which keep their size for every B and N.
    pub fn on(bundle: &Bundle, mut device: Box<dyn Device>) -> Result<Executor, ExecError> {
        let m = bundle.manifest.clone();
        let mut lens = vec![0; m.buffers.len()];
        for p in &m.params {
            let e = &m.buffers[p.buffer];
            let bytes = e.bytes.as_const().ok_or_else(|| {
                ExecError::Unsupported(format!(
                    "parameter `{}` has a buffer of size `{}`, not a constant",
                    p.name, e.bytes
                ))
            })?;
            let want = param_bytes(p)?;
            if bytes < 0 || bytes as usize != want {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "parameter `{}` of shape {:?} needs {want} bytes, its buffer has {bytes}",
                    p.name, p.shape
                ))));
            }
            lens[p.buffer] = want;
        }
        // Optimizer state is allocated once, zeroed, and kept like the parameters.
        for (i, b) in m.buffers.iter().enumerate().filter(|(_, b)| b.role == BufferRole::Optimizer) {
            let bytes = b.bytes.as_const().filter(|&n| n >= 0).ok_or_else(|| {
                ExecError::Bundle(BundleError::Invalid(format!(
                    "optimizer buffer {i} has size `{}`, not a constant",
                    b.bytes
                )))
            })?;
            lens[i] = bytes as usize;
        }
        let fixed = total_bytes(lens.iter().copied(), "its parameters and optimizer state")?;
        check_fits(device.as_ref(), fixed, "its parameters and optimizer state")?;
        for (i, &len) in lens.iter().enumerate() {
            if len > 0 {
                device.resize(i, len)?;
            }
        }
        Ok(Executor {
            sizes: vec![None; m.sizes.len()],
            scalars: vec![0; m.scalars.len()],
            manifest: m,
            dir: bundle.dir.clone(),
            device,
            lens,
            allocated_for: None,
            debug_nan: false,
            params_set: false,
            ran: HashSet::new(),
            bound: HashSet::new(),
            given: HashSet::new(),
            resident: HashSet::new(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The directory of the bundle this executor runs.
    pub fn bundle_dir(&self) -> &Path {
        &self.dir
    }

    /// One line naming the device (printed at the start of a run).
    pub fn describe_device(&self) -> String {
        self.device.describe()
    }

    /// In debug mode every buffer an entry point writes before reading (outputs,
    /// activations, gradients, workspace) is filled with NaN (`0xff` bytes) before the
    /// entry point runs, so a kernel that fails to write part of its output shows up.
    pub fn set_debug_nan(&mut self, on: bool) {
        self.debug_nan = on;
    }

    /// Sets a run-time scalar (`seed`, `step`, …) passed to kernels after the sizes.
    pub fn set_scalar(&mut self, name: &str, value: i64) -> Result<(), ExecError> {
        let i = self.manifest.scalars.iter().position(|s| s == name).ok_or_else(|| {
            ExecError::Sizes(format!("the bundle has no scalar `{name}` (it has {:?})", self.manifest.scalars))
        })?;
        self.scalars[i] = value;
        Ok(())
    }

    /// Sets size symbols explicitly (needed only when no input of an entry point has the
    /// symbol as a dimension). Inputs passed later must agree.
    pub fn set_sizes(&mut self, sizes: &[(&str, i64)]) -> Result<(), ExecError> {
        for &(name, v) in sizes {
            let i = self.manifest.sizes.iter().position(|s| s == name).ok_or_else(|| {
                ExecError::Sizes(format!("the bundle has no size `{name}` (it has {:?})", self.manifest.sizes))
            })?;
            if v < 0 {
                return Err(ExecError::Sizes(format!("size `{name}` = {v} is negative")));
            }
            self.sizes[i] = Some(v);
        }
        Ok(())
    }

    /// Allocates the buffers for `sizes` now, every size symbol of the bundle given, so
    /// that a caller learns before it starts (a training run, before it creates its
    /// directory) whether the activations fit the device; the first entry point at these
    /// sizes then allocates nothing.
    pub fn reserve(&mut self, sizes: &[(&str, i64)]) -> Result<(), ExecError> {
        self.set_sizes(sizes)?;
        let all: Option<Vec<i64>> = self.sizes.iter().copied().collect();
        let all = all.ok_or_else(|| {
            ExecError::Sizes(format!("reserving memory needs every size of the bundle ({:?})", self.manifest.sizes))
        })?;
        self.allocate(&all)
    }

    /// The current value of each size symbol.
    pub fn sizes(&self) -> Vec<(String, Option<i64>)> {
        self.manifest.sizes.iter().cloned().zip(self.sizes.iter().copied()).collect()
    }

    /// Initializes every parameter from `seed` (a parameter's own fixed seed wins) with
    /// the same values as the compiler's interpreter; baked values are read from the bundle.
    pub fn set_params_from_seed(&mut self, seed: u64) -> Result<(), ExecError> {
        let params = self.manifest.params.clone();
        let mut files = HashMap::new();
        for p in &params {
            let values = initial_values(&self.dir, p, seed, &mut files)?;
            self.write_param(p, &values)?;
        }
        self.device.synchronize()?;
        self.params_set = true;
        Ok(())
    }

    /// Reads every parameter by name from a safetensors file (f32, or f64, bf16, f16
    /// widened), checking shapes. A non-trainable parameter missing from the file is
    /// initialized when that needs no run seed (a baked value or a fixed seed).
    pub fn set_params_from_file(&mut self, path: impl AsRef<Path>) -> Result<(), ExecError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|error| ExecError::Io { path: path.into(), error })?;
        self.set_params_from_bytes(&bytes, &path.display().to_string())
    }

    /// [`Executor::set_params_from_file`] on the bytes of a safetensors file; `label`
    /// names it in messages. Any bytes set the parameters or give an error, never a panic
    /// (`tests/fuzz_loaders.rs`).
    pub fn set_params_from_bytes(&mut self, bytes: &[u8], label: &str) -> Result<(), ExecError> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| ExecError::Params(format!("{label} is not a safetensors file: {e}")))?;
        let params = self.manifest.params.clone();
        let mut files = HashMap::new();
        for p in &params {
            let values = match st.tensor(&p.name) {
                Ok(t) => tensor_values(&t, p, label)?,
                Err(_) if !p.trainable && (p.seed.is_some() || matches!(p.init, InitSpec::Baked { .. })) => {
                    initial_values(&self.dir, p, p.seed.unwrap_or(0), &mut files)?
                }
                Err(_) => {
                    return Err(ExecError::Params(format!("{label} has no tensor `{}`", p.name)));
                }
            };
            self.write_param(p, &values)?;
        }
        self.device.synchronize()?;
        self.params_set = true;
        Ok(())
    }

    /// Overwrites parameter `name` (f32, in row-major order; the length must match).
    pub fn set_param(&mut self, name: &str, values: &[f32]) -> Result<(), ExecError> {
        let p = self
            .manifest
            .params
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .ok_or_else(|| ExecError::Params(format!("the bundle has no parameter `{name}`")))?;
        if numel(&p)? != values.len() || p.dtype != DType::F32 {
            return Err(ExecError::Params(format!(
                "parameter `{name}` has shape {:?} ({}), got {} f32 values",
                p.shape,
                p.dtype,
                values.len()
            )));
        }
        self.write_param(&p, values)?;
        self.params_set = true;
        Ok(())
    }

    /// Writes every parameter to a safetensors file.
    pub fn save_params(&self, path: impl AsRef<Path>) -> Result<(), ExecError> {
        let mut values = Vec::new();
        for p in &self.manifest.params {
            values.push((p, self.device.download(p.buffer, param_bytes(p)?)?));
        }
        write_params(path.as_ref(), &values)
    }

    /// The current value of parameter `name`.
    pub fn param(&self, name: &str) -> Result<Tensor, ExecError> {
        let p = self
            .manifest
            .params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ExecError::Output(format!("the bundle has no parameter `{name}`")))?;
        let shape = p.shape.iter().map(|&d| d as usize).collect();
        Ok(Tensor::from_bytes(p.dtype, shape, &self.device.download(p.buffer, param_bytes(p)?)?))
    }

    /// The f32 values of the optimizer buffer `name` (`hyper`, `adam_m.<param>`, …; see
    /// [`BufferRole::Optimizer`]).
    pub fn optimizer_buffer(&self, name: &str) -> Result<Vec<f32>, ExecError> {
        let i = optimizer_buffer_index(&self.manifest, name)?;
        let bytes = self.device.download(i, self.lens[i])?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect())
    }

    /// Overwrites the optimizer buffer `name`; `values` must fill it exactly.
    pub fn set_optimizer_buffer(&mut self, name: &str, values: &[f32]) -> Result<(), ExecError> {
        let i = optimizer_buffer_index(&self.manifest, name)?;
        if self.lens[i] != values.len() * 4 {
            return Err(ExecError::Params(format!(
                "optimizer buffer `{name}` holds {} values, got {}",
                self.lens[i] / 4,
                values.len()
            )));
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.device.upload(i, &bytes)
    }

    /// Runs `forward` on the named inputs. Sizes (B, N) are taken from the inputs' shapes.
    pub fn forward(&mut self, inputs: &[(&str, &Tensor)]) -> Result<(), ExecError> {
        self.run("forward", inputs)
    }

    /// Runs `backward` (after `forward` with the same sizes); `inputs` are the backward
    /// entry point's own inputs, usually none.
    pub fn backward(&mut self, inputs: &[(&str, &Tensor)]) -> Result<(), ExecError> {
        if !self.ran.contains("forward") {
            return Err(ExecError::Order("backward needs a forward pass with the same sizes first".into()));
        }
        self.run("backward", inputs)
    }

    /// Runs any entry point (`forward`, `backward`, `step`, …): copies its inputs to the
    /// device and runs (or queues) its steps.
    pub fn run(&mut self, entry: &str, inputs: &[(&str, &Tensor)]) -> Result<(), ExecError> {
        self.entry_steps(entry)?;
        if !self.params_set && !self.manifest.params.is_empty() {
            return Err(ExecError::Order(
                "parameters are not set: call set_params_from_seed or set_params_from_file first".into(),
            ));
        }
        let sizes = bind_sizes(&self.manifest, &self.sizes, entry, inputs, &self.resident)?;
        if self.allocated_for.as_deref() != Some(&sizes[..]) {
            // New sizes reallocate: what `carry` kept on the device is gone.
            let kept = self.manifest.inputs.iter().filter(|io| io.entry == entry && self.resident.contains(&io.name));
            if let Some(io) = kept.into_iter().find(|io| !inputs.iter().any(|(n, _)| *n == io.name)) {
                return Err(ExecError::Input {
                    name: io.name.clone(),
                    message: "missing: the sizes changed since it was kept on the device (`carry`)".into(),
                });
            }
        }
        self.sizes = sizes.iter().map(|&v| Some(v)).collect();
        self.allocate(&sizes)?;
        self.check_order(entry)?;
        for &(name, t) in inputs {
            let io = self.manifest.inputs.iter().find(|io| io.name == name && io.entry == entry).expect("checked");
            let src = t.bytes();
            if src.len() > self.lens[io.buffer] {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "input `{name}` needs {} bytes, its buffer has {}",
                    src.len(),
                    self.lens[io.buffer]
                ))));
            }
            self.device.upload(io.buffer, &src)?;
        }
        self.given.insert(entry.to_string());
        self.launch(entry)
    }

    /// Runs `entry` again with the inputs it was last given (already on the device), e.g.
    /// to time it. An error if the sizes changed since, or it never ran.
    pub fn rerun(&mut self, entry: &str) -> Result<(), ExecError> {
        self.entry_steps(entry)?;
        let needs_inputs = self.manifest.inputs.iter().any(|io| io.entry == entry);
        if needs_inputs && !self.given.contains(entry) {
            return Err(ExecError::Order(format!("`{entry}` has no inputs on the device for the current sizes")));
        }
        if self.allocated_for.is_none() {
            return Err(ExecError::Order(format!("`{entry}` cannot rerun before any entry point ran")));
        }
        self.check_order(entry)?;
        self.launch(entry)
    }

    /// Waits for every queued step and copy; reports a kernel fault as an error.
    pub fn synchronize(&self) -> Result<(), ExecError> {
        self.device.synchronize()
    }

    /// Wall-clock milliseconds the entry points take, run in order with
    /// [`Executor::rerun`] until the device is idle again.
    pub fn time_ms(&mut self, entries: &[&str]) -> Result<f64, ExecError> {
        self.device.synchronize()?;
        let t = std::time::Instant::now();
        for e in entries {
            self.rerun(e)?;
        }
        self.device.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// Output `name` of the last run of the entry point that produces it.
    pub fn output(&self, name: &str) -> Result<Tensor, ExecError> {
        let io = self.manifest.outputs.iter().find(|o| o.name == name).ok_or_else(|| {
            ExecError::Output(format!(
                "the bundle has no output `{name}` (it has {:?})",
                self.manifest.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
            ))
        })?;
        if !self.ran.contains(&io.entry) {
            return Err(ExecError::Order(format!("output `{name}` is produced by `{}`, which has not run", io.entry)));
        }
        let sizes = self.allocated_for.clone().expect("ran implies allocated");
        let env = self.env(&sizes);
        let shape = io
            .shape
            .iter()
            .map(|d| d.eval(&env).map(|v| v.max(0) as usize))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ExecError::Sizes(format!("shape of output `{name}`: {e}")))?;
        let n = shape.iter().try_fold(io.dtype.bytes(), |a, &d| a.checked_mul(d)).ok_or_else(|| {
            ExecError::Sizes(format!("output `{name}` of shape {shape:?} has more bytes than this machine addresses"))
        })?;
        if n > self.lens[io.buffer] {
            return Err(ExecError::Bundle(BundleError::Invalid(format!(
                "output `{name}` needs {n} bytes, its buffer has {}",
                self.lens[io.buffer]
            ))));
        }
        Ok(Tensor::from_bytes(io.dtype, shape, &self.device.download(io.buffer, n)?))
    }

    /// Copies each output `from` of the last run into the input `to` on the device, where
    /// the next run of `to`'s entry point finds it without it being given: a decode step's
    /// new states become its next states with no copy through the host. The two must have
    /// the same element type and bytes at the current sizes.
    pub fn carry(&mut self, pairs: &[(&str, &str)]) -> Result<(), ExecError> {
        let sizes = self.allocated_for.clone().ok_or_else(|| ExecError::Order("carry before any run".into()))?;
        let env = self.env(&sizes);
        let bytes = |shape: &[crate::manifest::Poly], dtype: crate::manifest::DType| {
            shape.iter().try_fold(dtype.bytes() as i64, |a, d| d.eval(&env).map(|v| a * v)).ok()
        };
        let mut copies = Vec::with_capacity(pairs.len());
        for &(from, to) in pairs {
            let out = self.manifest.outputs.iter().find(|o| o.name == from);
            let out = out.ok_or_else(|| ExecError::Output(format!("the bundle has no output `{from}`")))?;
            if !self.ran.contains(&out.entry) {
                return Err(ExecError::Order(format!(
                    "output `{from}` is produced by `{}`, which has not run",
                    out.entry
                )));
            }
            let input = self.manifest.inputs.iter().find(|i| i.name == to);
            let input = input.ok_or_else(|| ExecError::Input { name: to.into(), message: "no such input".into() })?;
            match (bytes(&out.shape, out.dtype), bytes(&input.shape, input.dtype)) {
                (Some(n), Some(m)) if n == m && n >= 0 && out.dtype == input.dtype => {
                    copies.push((out.buffer, input.buffer, n as usize))
                }
                _ => {
                    return Err(ExecError::Input {
                        name: to.into(),
                        message: format!("cannot take output `{from}`: their types differ"),
                    })
                }
            }
        }
        for (&(_, to), (from, into, n)) in pairs.iter().zip(copies) {
            self.device.copy(from, into, n)?;
            self.resident.insert(to.to_string());
        }
        Ok(())
    }

    /// Every output of the last runs, by name.
    pub fn outputs(&self) -> Result<BTreeMap<String, Tensor>, ExecError> {
        self.manifest
            .outputs
            .iter()
            .filter(|o| self.ran.contains(&o.entry))
            .map(|o| Ok((o.name.clone(), self.output(&o.name)?)))
            .collect()
    }

    /// The gradient of every parameter that has one (buffers of role `grad`), by
    /// parameter name, after `backward`.
    pub fn gradients(&self) -> Result<BTreeMap<String, Tensor>, ExecError> {
        if !self.ran.contains("backward") {
            return Err(ExecError::Order("gradients need a backward pass first".into()));
        }
        let mut out = BTreeMap::new();
        for (i, p) in gradient_buffers(&self.manifest)? {
            let name = p.name.as_str();
            let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
            let n = param_bytes(p)?;
            if n > self.lens[i] {
                return Err(ExecError::Bundle(BundleError::Invalid(format!(
                    "gradient of `{name}` needs {n} bytes, its buffer has {}",
                    self.lens[i]
                ))));
            }
            out.insert(name.to_string(), Tensor::from_bytes(p.dtype, shape, &self.device.download(i, n)?));
        }
        Ok(out)
    }

    /// Bytes allocated for buffers (parameters, optimizer state, activations, gradients
    /// and workspace) at the current sizes.
    pub fn allocated_bytes(&self) -> usize {
        self.device.allocated_bytes()
    }

    /// The number of launches one run of `entry` makes.
    pub fn launch_count(&self, entry: &str) -> usize {
        self.manifest.entry_points.get(entry).map_or(0, Vec::len)
    }

    // -----------------------------------------------------------------------------------

    fn entry_steps(&self, entry: &str) -> Result<&[Step], ExecError> {
        self.manifest.entry_points.get(entry).map(Vec::as_slice).ok_or_else(|| {
            ExecError::Order(format!(
                "the bundle has no entry point `{entry}` (it has {:?})",
                self.manifest.entry_points.keys().collect::<Vec<_>>()
            ))
        })
    }

    fn check_order(&self, entry: &str) -> Result<(), ExecError> {
        if entry == "backward" && !self.ran.contains("forward") {
            return Err(ExecError::Order("backward needs a forward pass with the same sizes first".into()));
        }
        if entry == "accumulate" && !self.ran.contains("backward") {
            return Err(ExecError::Order("accumulate needs a backward pass first".into()));
        }
        Ok(())
    }

    fn env(&self, sizes: &[i64]) -> HashMap<&str, i64> {
        self.manifest.sizes.iter().map(String::as_str).zip(sizes.iter().copied()).collect()
    }

    fn write_param(&mut self, p: &ParamEntry, values: &[f32]) -> Result<(), ExecError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let n = bytes.len().min(self.lens[p.buffer]);
        self.device.upload(p.buffer, &bytes[..n])
    }

    /// Sizes every buffer but the parameters and the optimizer state for `sizes` (no-op
    /// when unchanged); the device's bindings are then made again on first use.
    fn allocate(&mut self, sizes: &[i64]) -> Result<(), ExecError> {
        if self.allocated_for.as_deref() == Some(sizes) {
            return Ok(());
        }
        let env = self.env(sizes);
        let mut lens = Vec::with_capacity(self.lens.len());
        for (i, b) in self.manifest.buffers.iter().enumerate() {
            let v = b.bytes.eval(&env).map_err(|e| ExecError::Sizes(format!("size of buffer {i}: {e}")))?;
            let v = usize::try_from(v).map_err(|_| {
                // A value such as the targets `tokens[:, 1:]` has N − 1 rows: N = 0 makes it
                // negative. Say which sizes are too small, not which buffer broke.
                let at = self.manifest.sizes.iter().zip(sizes).map(|(s, v)| format!("{s} = {v}")).collect::<Vec<_>>();
                let what = b.name.as_deref().map(|n| format!(" (`{n}`)")).unwrap_or_default();
                ExecError::Sizes(format!(
                    "the sizes {} are too small for this model: buffer {i}{what} would have {v} bytes",
                    at.join(", ")
                ))
            })?;
            lens.push(v);
        }
        let sized = |r: BufferRole| !matches!(r, BufferRole::Param | BufferRole::Optimizer);
        let at = self.manifest.sizes.iter().zip(sizes).map(|(s, v)| format!("{s} = {v}")).collect::<Vec<_>>();
        let growth = total_bytes(
            lens.iter()
                .zip(&self.lens)
                .zip(&self.manifest.buffers)
                .filter(|(_, b)| sized(b.role))
                .map(|((&new, &old), _)| new.saturating_sub(old)),
            &format!("its activations at {}", at.join(", ")),
        )?;
        check_fits(self.device.as_ref(), growth, &format!("its activations at {}", at.join(", ")))?;
        // Buffers may be replaced: nothing queued may still use them.
        self.device.synchronize()?;
        for (i, len) in lens.into_iter().enumerate() {
            if sized(self.manifest.buffers[i].role) {
                self.device.resize(i, len)?;
                self.lens[i] = len;
            }
        }
        self.allocated_for = Some(sizes.to_vec());
        self.ran.clear();
        self.bound.clear();
        self.given.clear();
        self.resident.clear();
        Ok(())
    }

    /// Binds `entry` on the device if needed, fills its outputs with NaN in debug mode,
    /// and launches it.
    fn launch(&mut self, entry: &str) -> Result<(), ExecError> {
        let sizes = self.allocated_for.clone().expect("allocated before launching");
        if !self.bound.contains(entry) {
            let launches = self.launches(entry, &sizes)?;
            let env: HashMap<&str, i64> =
                self.manifest.sizes.iter().map(String::as_str).zip(sizes.iter().copied()).collect();
            self.device.bind(entry, launches, &env)?;
            self.bound.insert(entry.to_string());
        }
        if self.debug_nan {
            self.fill_nan(entry)?;
        }
        let args: Vec<i64> = sizes.iter().chain(&self.scalars).copied().collect();
        self.device.launch(entry, &args)?;
        if entry == "forward" {
            self.ran.clear();
        }
        self.ran.insert(entry.to_string());
        Ok(())
    }

    /// `entry`'s steps at `sizes`: extents evaluated, GEMM shapes checked against the
    /// buffers they read and write.
    fn launches(&self, entry: &str, sizes: &[i64]) -> Result<Vec<Launch>, ExecError> {
        let env = self.env(sizes);
        let mut launches = Vec::new();
        for s in self.entry_steps(entry)? {
            let k = &self.manifest.kernels[s.kernel];
            let extent =
                k.extent.eval(&env).map_err(|e| ExecError::Sizes(format!("extent of kernel `{}`: {e}", k.name)))?;
            if extent < 0 {
                return Err(ExecError::Sizes(format!("kernel `{}` has a negative extent {extent}", k.name)));
            }
            let gemm = match &k.gemm {
                Some(g) => {
                    // The views may use the step's launch arguments.
                    let mut env = env.clone();
                    env.extend(k.args.iter().map(String::as_str).zip(s.args.iter().copied()));
                    let shape = gemm::Shape::eval(g, &env)
                        .map_err(|e| ExecError::Sizes(format!("GEMM of kernel `{}`: {e}", k.name)))?;
                    let operands = match k.buffers[gemm::SLOT_A].elem {
                        DType::BF16 => gemm::Operands::BF16,
                        DType::F16 => gemm::Operands::F16,
                        _ => gemm::Operands::F32,
                    };
                    let elems = [operands.bytes(), operands.bytes(), 4];
                    let lens = [gemm::SLOT_A, gemm::SLOT_B, gemm::SLOT_C].map(|i| self.lens[s.buffers[i]] / elems[i]);
                    shape.check(lens).map_err(|e| {
                        ExecError::Bundle(BundleError::Invalid(format!("library kernel `{}`: {e}", k.name)))
                    })?;
                    if shape.extent() != Some(extent) {
                        return Err(ExecError::Bundle(BundleError::Invalid(format!(
                            "library kernel `{}` has extent {extent}, its GEMM covers {}",
                            k.name,
                            shape.extent().unwrap_or(-1)
                        ))));
                    }
                    Some((shape, operands))
                }
                None => None,
            };
            launches.push(Launch { kernel: s.kernel, buffers: s.buffers.clone(), extent, args: s.args.clone(), gemm });
        }
        Ok(launches)
    }

    /// NaN bytes into every buffer `entry` writes before reading.
    fn fill_nan(&mut self, entry: &str) -> Result<(), ExecError> {
        let mut first: BTreeMap<usize, Access> = BTreeMap::new();
        for s in self.entry_steps(entry)? {
            let k = &self.manifest.kernels[s.kernel];
            for (slot, &b) in k.buffers.iter().zip(&s.buffers) {
                first.entry(b).or_insert(slot.access);
            }
        }
        for (b, access) in first {
            let role = self.manifest.buffers[b].role;
            if access == Access::Write
                && !matches!(role, BufferRole::Param | BufferRole::Input | BufferRole::Optimizer)
                && self.lens[b] > 0
            {
                self.device.fill(b, 0xff)?;
            }
        }
        Ok(())
    }
}

/// An error when `bytes` more do not fit in what `device` has free.
fn check_fits(device: &dyn Device, bytes: usize, what: &str) -> Result<(), ExecError> {
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    match device.free_bytes() {
        Some(free) if bytes > free => Err(ExecError::Memory(format!(
            "the model does not fit on {}: {what} need {:.2} GiB more, {:.2} GiB are free",
            device.describe(),
            gib(bytes),
            gib(free)
        ))),
        _ => Ok(()),
    }
}

/// Checks `inputs` against `entry`'s inputs of `m` and returns the sizes they imply:
/// `current` (explicit or previous values) overridden by input dimensions that are a bare
/// size symbol; every input's shape must then evaluate to what was given.
fn bind_sizes(
    m: &Manifest,
    current: &[Option<i64>],
    entry: &str,
    inputs: &[(&str, &Tensor)],
    resident: &HashSet<String>,
) -> Result<Vec<i64>, ExecError> {
    let expected: Vec<_> = m.inputs.iter().filter(|io| io.entry == entry).collect();
    let mut given: Vec<(&str, &crate::manifest::IoEntry, &Tensor)> = Vec::new();
    for &(name, t) in inputs {
        let Some(io) = expected.iter().find(|io| io.name == name) else {
            return Err(ExecError::Input {
                name: name.into(),
                message: format!(
                    "`{entry}` has no such input (its inputs are {:?})",
                    expected.iter().map(|io| &io.name).collect::<Vec<_>>()
                ),
            });
        };
        if given.iter().any(|g| g.0 == name) {
            return Err(ExecError::Input { name: name.into(), message: "given twice".into() });
        }
        given.push((name, io, t));
        if t.dtype() != io.dtype {
            return Err(ExecError::Input {
                name: name.into(),
                message: format!("has element type {}, expected {}", t.dtype(), io.dtype),
            });
        }
        if t.len() != t.shape.iter().product::<usize>() {
            return Err(ExecError::Input {
                name: name.into(),
                message: format!("has {} values for shape {:?}", t.len(), t.shape),
            });
        }
    }
    if let Some(io) = expected.iter().find(|io| !given.iter().any(|g| g.0 == io.name) && !resident.contains(&io.name)) {
        return Err(ExecError::Input { name: io.name.clone(), message: format!("missing (needed by `{entry}`)") });
    }
    let shape_err = |io: &crate::manifest::IoEntry, t: &Tensor, env: Option<&HashMap<&str, i64>>| {
        let decl = io.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        let vals = env
            .and_then(|env| io.shape.iter().map(|d| d.eval(env).ok()).collect::<Option<Vec<_>>>())
            .map(|v| format!(" = {v:?}"))
            .unwrap_or_default();
        ExecError::Input { name: io.name.clone(), message: format!("has shape {:?}, expected [{decl}]{vals}", t.shape) }
    };
    // Sizes: explicit or previous values, overridden by dimensions that are a bare symbol.
    let mut sizes = current.to_vec();
    let mut from: Vec<Option<&str>> = vec![None; sizes.len()];
    for &(name, io, t) in &given {
        if t.shape.len() != io.shape.len() {
            return Err(shape_err(io, t, None));
        }
        for (d, &v) in io.shape.iter().zip(&t.shape) {
            if let Some(s) = d.as_sym() {
                let Some(i) = m.sizes.iter().position(|x| x == s) else { continue };
                match from[i] {
                    Some(other) if sizes[i] != Some(v as i64) => {
                        return Err(ExecError::Input {
                            name: name.into(),
                            message: format!(
                                "has {s} = {v} (shape {:?}), but input `{other}` has {s} = {}",
                                t.shape,
                                sizes[i].unwrap_or(0)
                            ),
                        });
                    }
                    _ => {
                        sizes[i] = Some(v as i64);
                        from[i] = Some(name);
                    }
                }
            }
        }
    }
    let sizes: Vec<i64> = sizes
        .iter()
        .zip(&m.sizes)
        .map(|(v, s)| {
            v.ok_or_else(|| {
                ExecError::Sizes(format!(
                    "size `{s}` is unknown: no input of `{entry}` has it as a dimension; call set_sizes"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let env: HashMap<&str, i64> = m.sizes.iter().map(String::as_str).zip(sizes.iter().copied()).collect();
    for &(_, io, t) in &given {
        let ok = io.shape.iter().zip(&t.shape).all(|(d, &v)| d.eval(&env).ok() == Some(v as i64));
        if !ok {
            return Err(shape_err(io, t, Some(&env)));
        }
        // Indices outside their tables are an error, never clamped (`index_bounds.rs`).
        if let (false, Some(values)) = (io.bounds.is_empty(), t.as_i32()) {
            let bounds: Vec<i64> = io
                .bounds
                .iter()
                .map(|b| b.eval(&env))
                .collect::<Result<_, _>>()
                .map_err(|e| ExecError::Input { name: io.name.clone(), message: format!("its bound: {e}") })?;
            crate::index_bounds::check_values(values.iter().map(|&v| v as i64), &bounds)
                .map_err(|message| ExecError::Input { name: io.name.clone(), message })?;
        }
    }
    Ok(sizes)
}

/// The initial values of parameter `p`: baked ones read from the bundle in `dir` (files
/// cached in `files`), else drawn from its own seed or `seed`.
fn initial_values(
    dir: &Path,
    p: &ParamEntry,
    seed: u64,
    files: &mut HashMap<String, Vec<u8>>,
) -> Result<Vec<f32>, ExecError> {
    if p.dtype != DType::F32 {
        return Err(ExecError::Unsupported(format!("parameter `{}` has element type {}", p.name, p.dtype)));
    }
    if let InitSpec::Baked { file, tensor } = &p.init {
        if !files.contains_key(file) {
            let path = dir.join(file);
            let bytes = std::fs::read(&path).map_err(|error| ExecError::Io { path: path.clone(), error })?;
            files.insert(file.clone(), bytes);
        }
        let st = safetensors::SafeTensors::deserialize(&files[file])
            .map_err(|e| ExecError::Params(format!("bundle file `{file}` is not a safetensors file: {e}")))?;
        let t = st.tensor(tensor).map_err(|_| {
            ExecError::Params(format!("bundle file `{file}` has no tensor `{tensor}` for `{}`", p.name))
        })?;
        return tensor_values(&t, p, &format!("bundle file `{file}`"));
    }
    let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
    init_values_f32(&p.init, &shape, &p.name, p.seed.unwrap_or(seed))
        .map_err(|e| ExecError::Params(format!("parameter `{}`: {e}", p.name)))
}

/// The bytes of parameter `p`'s values.
fn param_bytes(p: &ParamEntry) -> Result<usize, ExecError> {
    numel(p)?
        .checked_mul(p.dtype.bytes())
        .ok_or_else(|| ExecError::Params(format!("parameter `{}` has an invalid shape {:?}", p.name, p.shape)))
}

/// The sum of buffer sizes, refused when it overflows: a damaged or hand-edited manifest
/// must give an error, not a wrapped size or a panic.
fn total_bytes(lens: impl IntoIterator<Item = usize>, what: &str) -> Result<usize, ExecError> {
    lens.into_iter()
        .try_fold(0usize, usize::checked_add)
        .ok_or_else(|| ExecError::Memory(format!("{what} need more bytes than this machine addresses")))
}

fn numel(p: &ParamEntry) -> Result<usize, ExecError> {
    p.shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))
        .ok_or_else(|| ExecError::Params(format!("parameter `{}` has an invalid shape {:?}", p.name, p.shape)))
}

/// f32 values of a safetensors tensor for parameter `p`, checking its shape.
fn tensor_values(t: &safetensors::tensor::TensorView<'_>, p: &ParamEntry, source: &str) -> Result<Vec<f32>, ExecError> {
    let want: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
    if t.shape() != want.as_slice() {
        return Err(ExecError::Params(format!(
            "parameter `{}`: {source} has shape {:?}, the model has {want:?}",
            p.name,
            t.shape()
        )));
    }
    let d = t.data();
    match t.dtype() {
        safetensors::Dtype::F32 => Ok(d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
        safetensors::Dtype::F64 => {
            Ok(d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect())
        }
        // 16-bit floats widen exactly (a checkpoint exported in bf16 or f16).
        safetensors::Dtype::BF16 => {
            Ok(d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
        }
        safetensors::Dtype::F16 => {
            Ok(d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
        }
        other => Err(ExecError::Params(format!(
            "parameter `{}`: {source} stores it as {other:?}; expected F32, F64, BF16 or F16",
            p.name
        ))),
    }
}

/// Writes parameters (each with its native-order bytes) to a safetensors file.
fn write_params(path: &Path, values: &[(&ParamEntry, Vec<u8>)]) -> Result<(), ExecError> {
    let owned: Vec<(&ParamEntry, Vec<usize>, Vec<u8>)> = values
        .iter()
        .map(|(p, bytes)| (*p, p.shape.iter().map(|&d| d as usize).collect(), le_bytes(p.dtype, bytes)))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(p, shape, bytes)| {
            let dt = match p.dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F16 => safetensors::Dtype::F16,
                DType::I32 => safetensors::Dtype::I32,
                DType::U8 => safetensors::Dtype::U8,
            };
            let view = safetensors::tensor::TensorView::new(dt, shape.clone(), bytes).expect("shape matches buffer");
            (p.name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| ExecError::Params(format!("cannot write {}: {e}", path.display())))
}

/// Native-order element bytes to little-endian (safetensors' byte order).
fn le_bytes(dtype: DType, bytes: &[u8]) -> Vec<u8> {
    if cfg!(target_endian = "little") || dtype == DType::U8 {
        return bytes.to_vec();
    }
    let n = dtype.bytes();
    bytes.chunks_exact(n).flat_map(|c| c.iter().rev().copied().collect::<Vec<_>>()).collect()
}

/// The index of the optimizer buffer called `name`.
fn optimizer_buffer_index(manifest: &Manifest, name: &str) -> Result<usize, ExecError> {
    manifest.buffers.iter().position(|b| b.role == BufferRole::Optimizer && b.name.as_deref() == Some(name)).ok_or_else(
        || {
            ExecError::Params(format!(
                "the bundle has no optimizer buffer `{name}` (compile it with `tnc compile --train`)"
            ))
        },
    )
}

/// Every gradient buffer (role `grad`) with the parameter it belongs to.
fn gradient_buffers(manifest: &Manifest) -> Result<Vec<(usize, &ParamEntry)>, ExecError> {
    let mut out = Vec::new();
    for (i, b) in manifest.buffers.iter().enumerate() {
        if b.role != BufferRole::Grad {
            continue;
        }
        let name = b.name.as_deref().ok_or_else(|| {
            ExecError::Bundle(BundleError::Invalid(format!("gradient buffer {i} does not name its parameter")))
        })?;
        let p = manifest.params.iter().find(|p| p.name == name).ok_or_else(|| {
            ExecError::Bundle(BundleError::Invalid(format!("gradient buffer {i} names unknown parameter `{name}`")))
        })?;
        out.push((i, p));
    }
    Ok(out)
}
