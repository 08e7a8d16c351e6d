//! The pure engine of the abuse filter: no proxy-wasm here, so everything is
//! unit- and property-tested natively. The host (the wasm filter, or a test)
//! reads the request, calls [`Engine::on_request`], and acts on the
//! [`Verdict`]; per-client state goes through the [`SharedStore`] trait.
//!
//! Layers, lowest first; a module imports only from its own layer or below
//! (`python3 engine/check_layers.py` checks it, and that no two files
//! import each other in a cycle):
//!
//! 1. **primitives**: `codec` (fixed-layout reader/writer), `window`
//!    (sliding counts), `sketch` (distinct counts), `hash` (keyed SipHash),
//!    `risk` (decay), `facts` (the facts header), `validate` (ConfigError
//!    and range checks), `policy` (Mode, DetectorAction);
//! 2. **reason** and naming: `reason` (why a client is judged), `identity`
//!    (who the client is, the `client` section), `routes` (route groups);
//! 3. **records**, byte by byte: `record` (the `Record` trait, its macro,
//!    client records), `profile`, `account`, `endpoint`, `session`, `wire`
//!    (the scorer's wire format);
//! 4. **state**: `state::{shard, store, layout, tiers, merge}` (the tiers
//!    and their merge rules, see [`state`]), `known_accounts`;
//! 5. **detectors**: one file each, with its configuration section
//!    ([`detectors`]); `rules` (the operator's detectors as data);
//!    `verdict`, `login_risk`;
//! 6. **config**: the top-level [`Config`], shared sections, parsing;
//! 7. **services** on a config: `callout` (the scorer tier's client),
//!    `exemptions`;
//! 8. **engine**: the pipeline of stages ([`engine`]).

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
pub mod object_route;
pub mod policy;
pub mod profile;
pub mod reason;
pub mod record;
pub mod risk;
pub mod routes;
pub mod rules;
pub mod session;
pub mod sketch;
pub mod state;
pub mod stats;
pub mod validate;
pub mod verdict;
pub mod window;
pub mod wire;

pub use config::{Config, ConfigError, Mode};
pub use engine::{Engine, Exchange, RequestFacts, RuleAnswer, SEED_KEY, STATE_PREFIX};
pub use hash::SEED_BYTES;
pub use identity::{ClientAddr, IdentityInput};
pub use reason::{Reason, ReasonSet};
pub use state::store::{MemoryStore, SharedStore, StoreError};
// The state modules keep their old paths too (`abuse_engine::store`, ...).
pub use state::{layout, merge, shard, store, tiers};
pub use verdict::{Action, CalloutPlan, Verdict};
