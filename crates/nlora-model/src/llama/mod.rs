//! LLaMA-family decoder (LLaMA, SmolLM2, Qwen2-style biases) written for training with LoRA sites.
pub mod config;
pub use config::LlamaConfig;
