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
pub mod login_risk;
pub mod profile;
pub mod reason;
pub mod record;
pub mod risk;
pub mod routes;
pub mod session;
pub mod sketch;
pub mod state;
pub mod validate;
pub mod verdict;
pub mod window;
pub mod wire;

pub use config::{Config, ConfigError, Mode};
pub use engine::{Engine, Exchange, RequestFacts, SEED_KEY, STATE_PREFIX};
pub use hash::SEED_BYTES;
pub use identity::{ClientAddr, IdentityInput};
pub use reason::{Reason, ReasonSet};
pub use state::store::{MemoryStore, SharedStore, StoreError};
// The state modules keep their old paths too (`abuse_engine::store`, ...).
pub use state::{layout, merge, shard, store, tiers};
pub use verdict::{Action, CalloutPlan, Verdict};
