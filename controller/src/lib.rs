//! The control plane as a multi-tenant generation service over NATS.
//!
//! - [`api`]: the client API on `faasmoe.v1.generate.<tenant>` (JSON or msgpack, streaming),
//!   typed errors, tokenization, quota admission;
//! - [`engine`]: continuous batching across tenants, prefill and decode together, two
//!   pipelined micro-batches;
//! - [`dispatch`]: the routed experts of each MoE layer, packed per function and sent over
//!   NATS with timeouts, retries and activation (or computed in-process);
//! - [`sampling`], [`tokenizer`], [`quota`].
//!
//! It does not spawn workers (the broker does) nor store quotas (it asks a [`quota::QuotaGate`]).

pub mod api;
pub mod completion;
pub mod dispatch;
pub mod engine;
pub mod quota;
pub mod sampling;
pub mod service;
pub mod tokenizer;
