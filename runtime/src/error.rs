//! Why an executor could not be built or could not run: one error type for every device.

use crate::bundle::BundleError;
use crate::manifest::CPU_KERNELS_FILE;
use std::fmt;
use std::path::PathBuf;

/// The message of [`ExecError::NoDriver`].
pub const NO_DRIVER: &str = "no CUDA driver found (libcuda.so could not be loaded)";

/// Why an executor could not be built or could not run.
#[derive(Debug)]
pub enum ExecError {
    Bundle(BundleError),
    /// `kernels.so` could not be loaded.
    Library {
        path: PathBuf,
        message: String,
    },
    /// A kernel's symbol is missing from `kernels.so`.
    Symbol {
        kernel: String,
        symbol: String,
        message: String,
    },
    /// The bundle needs something this executor does not implement.
    Unsupported(String),
    /// Sizes could not be determined or evaluated.
    Sizes(String),
    /// An input is unknown, missing, or has the wrong shape or type.
    Input {
        name: String,
        message: String,
    },
    /// Parameters could not be set.
    Params(String),
    /// Calls in the wrong order (backward before forward, forward before parameters, …).
    Order(String),
    /// An unknown output or gradient.
    Output(String),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The CUDA driver library (`libcuda.so`) is not installed on this host.
    NoDriver,
    /// A kernel failed where the device can tell (the emulated GPU's bounds, race and
    /// barrier checks): the kernel and what went wrong.
    Fault {
        kernel: String,
        message: String,
    },
    /// The buffers do not fit in the device's memory: what is needed and what is free.
    Memory(String),
    /// A CUDA driver call failed: what was being done, and the driver's message.
    Cuda {
        what: String,
        message: String,
    },
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::Bundle(e) => e.fmt(f),
            ExecError::Library { path, message } => write!(f, "cannot load {}: {message}", path.display()),
            ExecError::Symbol { kernel, symbol, message } => {
                write!(f, "kernel `{kernel}`: symbol `{symbol}` not found in {CPU_KERNELS_FILE}: {message}")
            }
            ExecError::Unsupported(m) => write!(f, "not supported by this executor: {m}"),
            ExecError::Sizes(m) => f.write_str(m),
            ExecError::Input { name, message } => write!(f, "input `{name}`: {message}"),
            ExecError::Params(m) => f.write_str(m),
            ExecError::Order(m) => f.write_str(m),
            ExecError::Output(m) => f.write_str(m),
            ExecError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            ExecError::NoDriver => f.write_str(NO_DRIVER),
            ExecError::Memory(m) => f.write_str(m),
            ExecError::Fault { kernel, message } => write!(f, "kernel `{kernel}` failed: {message}"),
            ExecError::Cuda { what, message } => write!(f, "CUDA error {what}: {message}"),
        }
    }
}

impl std::error::Error for ExecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExecError::Bundle(e) => Some(e),
            ExecError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<BundleError> for ExecError {
    fn from(e: BundleError) -> ExecError {
        ExecError::Bundle(e)
    }
}
