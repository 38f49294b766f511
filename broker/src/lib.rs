//! The faasmoe FaaS platform on NATS: everything that turns a checkpoint and a NATS server
//! into on-demand expert functions and admitted tenants.
//!
//! It starts `nats-server` with the project's `nats.conf` when no external server is given
//! ([`server`]), reads the deployment of one model (granularity, idle timeout, instance caps:
//! [`deployment`]), answers activation requests by spawning expert worker instances through a
//! pluggable backend ([`spawner`], [`activation`]) and records their lifecycle, and keeps the
//! tenants' quotas and usage in JetStream KV with atomic admission ([`tenants`]).
//!
//! It deliberately never touches tensors or expert requests (the workers compute, the
//! controller dispatches), does not restart instances on its own (scale to zero is the
//! workers' idle exit; the next activation starts a new one), and does not decide routing
//! or batching. Subjects come from `faasmoe-proto`; the only model knowledge it needs is the
//! checkpoint's `config.json` (MoE layers, experts per layer) to derive the function layout.

#![warn(missing_docs)]

pub mod activation;
pub mod credentials;
pub mod deployment;
pub mod metrics;
pub mod server;
pub mod server_config;
pub mod spawner;
pub mod tenants;

pub use activation::{ActivationConfig, Activator, InstanceInfo, InstanceState};
pub use credentials::InternalCredentials;
pub use deployment::Deployment;
pub use server::{EmbeddedServer, ServerOptions};
pub use server_config::{
    reload, render_config, RuntimeConfig, RuntimeError, RuntimeState, ServerControl, TenantAdmin,
    TENANTS_MARKER,
};
pub use spawner::{Instance, InstanceBackend, InstanceExit, LocalProcessBackend, SpawnError};
pub use tenants::{
    Admission, Quota, QuotaError, QuotaKind, TenantCredentials, TenantError, TenantRecord,
    TenantStore, TenantStoreConfig, TenantsConf, Usage,
};
