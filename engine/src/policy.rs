//! The operator's two verbs, below every layer that needs them: the
//! filter's [`Mode`] (monitor or block, per route group too) and what a
//! detector's signal may do ([`DetectorAction`], per reason).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Record, tag and count what block mode would do, but never block.
    #[default]
    Monitor,
    /// Block clients whose risk reaches `risk.block_at`.
    Block,
}

/// What a detector's signal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum DetectorAction {
    /// Adds its weight to the risk; can block.
    Block,
    /// Adds its weight but can never, alone, lift the risk to `block_at`.
    Tag,
    /// Counted and shown in stats and reasons; adds no risk.
    Monitor,
    /// Refuses this one request (429) and adds no risk: for volume, where
    /// the excess is shed and the penalty box is kept for abuse evidence.
    /// With other blocking evidence on the client, counts as `block`.
    Shed,
}
