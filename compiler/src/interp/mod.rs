//! The reference interpreter: plain-loop evaluation of the graph IR in f64 (or with f32
//! rounding after every op), parameter initialization, safetensors I/O and the closeness
//! metric every numerical test uses. It is the ground truth for gradients, fused ops and
//! generated kernels, so it is written for clarity first.

pub mod block_attention;
pub mod closeness;
pub mod cross_entropy;
pub mod eval;
pub mod init;
pub mod io;
pub mod linear_attention;
mod math;
pub mod params;
mod scatter;
mod shape;
pub mod tensor;

pub use closeness::{compare, Closeness};
pub use eval::{evaluate, EvalOptions, Evaluation};
pub use init::{init_param, init_params, xavier_bound};
pub use io::{read_params, read_safetensors, write_safetensors, FileDType};
pub use params::{bind_params, check_inputs};
pub use tensor::{Precision, Tensor};
