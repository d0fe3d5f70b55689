//! The peers comparison (stub; being written).

use crate::BoxError;

/// The options of `bench peers`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs `bench peers`.
pub fn main(_args: &Args) -> Result<bool, BoxError> {
    Err("not yet".into())
}
