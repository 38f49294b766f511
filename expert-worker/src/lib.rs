//! One expert function instance.
//!
//! Loads only its routed experts ([`faasmoe_model::ExpertSet`]), subscribes to each expert's
//! subject in the function's queue group (so N instances share the load and a new one joins
//! by starting), batches requests from every controller and tenant that arrive within the
//! window into one computation per expert, replies to each, and exits when idle (scale to
//! zero) after draining its subscriptions so no delivered request is lost.
//!
//! It does not know about tenants' quotas, tokenizers or the control plane: a request is
//! rows of hidden states and routes, a reply is rows of expert outputs.

pub mod drain;
pub mod function;
pub mod outage;
pub mod settings;
pub mod stats;
pub mod worker;

pub use settings::Settings;
pub use worker::{run, ExitReason};
