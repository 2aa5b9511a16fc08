//! LoRA adapter sites: the one place LoRA's forward lives.
//!
//! An [`AdapterSite`] is one adapted linear layer (PEFT's `LoraLinear`):
//! frozen base weight W0, the frozen adapters of earlier tasks and the
//! trainable adapter of the current task,
//! `y = W0 x + sum_i s_i B_i A_i x + s B A dropout(x)` with PEFT shapes
//! (A `(r, in)`, B `(out, r)`, `s = alpha / r`). [`AdapterSites`] holds all
//! sites of a model by module path and saves/loads adapters in PEFT format.
//! Nothing here knows any architecture.
pub mod config;
pub mod device;
pub mod error;
pub mod frozen;
pub mod kernels;
mod lora_op;
pub mod peft;
pub mod profile;
pub mod site;
pub mod sites;

pub use config::LoraConfig;
pub use device::{use_fused, with_composed_ops, DeviceSpec};
pub use error::{AdapterError, Result};
pub use frozen::{frozen_matmul_t, FrozenLinear};
pub use peft::{PeftAdapter, PeftConfig};
pub use site::{AdapterSite, ForwardMode, FrozenAdapter, LoraAdapter};
pub use sites::{AdapterSites, SiteId};
