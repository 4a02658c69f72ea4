//! The sandbox bank's injected faults, drawn from a seeded generator so that a failing run can
//! be replayed.

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tonic::Status;

use super::SandboxConfig;

/// The fault generator and the odds it draws against.
pub(super) struct Faults {
    rng: StdRng,
    unavailable_per_mille: u32,
    late_reply_per_mille: u32,
}

impl Faults {
    pub(super) fn new(config: &SandboxConfig) -> Self {
        Self {
            rng: StdRng::seed_from_u64(config.seed),
            unavailable_per_mille: config.unavailable_per_mille,
            late_reply_per_mille: config.late_reply_per_mille,
        }
    }

    /// Whether this call is refused as unavailable, before anything is applied.
    pub(super) fn unavailable(&mut self) -> bool {
        roll(&mut self.rng, self.unavailable_per_mille)
    }

    /// Whether this submission is answered only after the late-reply delay.
    pub(super) fn late_reply(&mut self) -> bool {
        roll(&mut self.rng, self.late_reply_per_mille)
    }
}

/// Draws once per call whatever the odds, so that the sequence of draws, and with it every
/// later fault, depends only on the sequence of calls.
fn roll(rng: &mut StdRng, per_mille: u32) -> bool {
    rng.random_range(0..1000u32) < per_mille
}

/// The answer to a call refused as unavailable.
pub(super) fn unavailable() -> Status {
    Status::unavailable("sandbox bank is temporarily unavailable (injected fault)")
}
