//! `--device` and `--dtype` for the commands that run a model.
use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use nlora_adapter::DeviceSpec;

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where to compute: cpu, cuda or cuda:N (needs an nlora built with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Base weights' precision: f32 or bf16 (adapters stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl DeviceArgs {
    /// The opened device and the base dtype, or one clear message.
    pub fn open(&self) -> Result<(Device, DType)> {
        let spec: DeviceSpec = self.device.parse().map_err(anyhow::Error::msg)?;
        let dtype =
            nlora_adapter::device::parse_base_dtype(&self.dtype).map_err(anyhow::Error::msg)?;
        Ok((spec.open().map_err(anyhow::Error::msg)?, dtype))
    }
}
