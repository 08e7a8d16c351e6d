//! The pure engine of the abuse filter: no proxy-wasm here, so everything is
//! unit- and property-tested natively. The host (the wasm filter, or a test)
//! reads the request, calls [`Engine::on_request`], and acts on the
//! [`Verdict`]; per-client state goes through the [`SharedStore`] trait.

pub mod account;
pub mod callout;
pub mod codec;
pub mod config;
pub mod detectors;
pub mod endpoint;
pub mod engine;
pub mod exemptions;
pub mod facts;
pub mod hash;
pub mod identity;
pub mod known_accounts;
pub mod layout;
pub mod login_risk;
pub mod merge;
pub mod profile;
pub mod reason;
pub mod record;
pub mod risk;
pub mod routes;
pub mod session;
pub mod shard;
pub mod sketch;
pub mod store;
pub mod tiers;
pub mod validate;
pub mod verdict;
pub mod window;
pub mod wire;

pub use config::{Config, ConfigError, Mode};
pub use engine::{Engine, Exchange, RequestFacts, SEED_KEY, STATE_PREFIX};
pub use hash::SEED_BYTES;
pub use identity::{ClientAddr, IdentityInput};
pub use reason::{Reason, ReasonSet};
pub use store::{MemoryStore, SharedStore, StoreError};
pub use verdict::{Action, CalloutPlan, Verdict};
