//! LLaMA-family decoder (LLaMA, SmolLM2, Qwen2-style biases) written for training with LoRA sites.
pub mod config;
pub mod fused;
pub mod model;

pub use config::LlamaConfig;
pub use model::Llama;
