//! N-LoRA's regularisers and the paper's metrics: pure functions of tensors,
//! no model, no I/O.
//!
//! Paper: "Is Parameter Collision Hindering Continual Learning in LLMs?"
//! (N-LoRA). Shapes follow PEFT: lora_A (r, in), lora_B (out, r), the update
//! dW = scale * B @ A (out, in); the paper's h = xW layout is the transpose.
//!
//! - [`penalty`]: training penalties on candle tensors, differentiable
//!   (N-LoRA's l1, eq. 3-4; O-LoRA's orthogonality, eq. 1; ablations).
//! - [`metrics`]: AA (eq. 5), forgetting (eq. 6), BWT/FWT; OO (eq. 7), AWOM
//!   (eq. 8), GSR (eq. 16), CR/ACR (eq. 10-11), nuclear norm.
//! - [`capacity`]: beyond the paper — a density controller for lambda, a
//!   sampled collision monitor, and a capacity forecast.

#![warn(missing_docs)]

pub mod capacity;
pub mod error;
pub mod metrics;
pub mod penalty;

pub use error::{MathError, Result};
