//! The versioned subject scheme. Every subject and queue group name in faasmoe is built here;
//! call sites never `format!` subjects themselves.
//!
//! | subject | who listens | payload |
//! |---|---|---|
//! | `faasmoe.v1.expert.<model>.<layer>.<expert>` | expert functions (queue group per function) | [`crate::expert`] msgpack |
//! | `faasmoe.v1.generate.<tenant>` | controllers | [`crate::generate`] JSON or msgpack |
//! | `faasmoe.v1.activate.<model>` | the broker | [`crate::activation`] JSON |
//! | `faasmoe.v1.reply.<requester>.<nuid>.<token>` | the controller's dispatcher (its connection's inbox prefix, [`reply_prefix`]): the reply to one activation or expert request | as the request's reply |
//! | `faasmoe.v1.events.<model>` | anyone (published by the broker) | [`crate::events`] JSON |
//! | `faasmoe.v1.admin.<verb>` | the broker | broker-defined JSON |
//!
//! Names (model, tenant, function id, admin verb) are single NATS tokens: non-empty, only
//! `[A-Za-z0-9_-]`, so no dots, wildcards or whitespace can change a subject's meaning.
//! A model id such as `Qwen1.5-MoE-A2.7B` must therefore be given a dot-free id
//! (e.g. `qwen15-moe-a27b`).

/// The protocol version carried by every versioned message and in every subject (`v1`).
pub const PROTOCOL_VERSION: u16 = 1;

/// The prefix of every faasmoe subject; matches [`PROTOCOL_VERSION`].
pub const PREFIX: &str = "faasmoe.v1";

/// Longest subject token [`validate_token`] accepts, bytes. nats-server closes a connection
/// whose protocol line exceeds `max_control_line` (4096 bytes by default), so a name taken
/// from a client (a tenant name in an API key) must be bounded before it goes into a subject:
/// otherwise one request would cut the connection that every tenant's requests share.
pub const MAX_TOKEN_LEN: usize = 128;

/// A name that cannot be used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The name is longer than [`MAX_TOKEN_LEN`] bytes.
    #[error("{kind} name has {len} bytes; at most {MAX_TOKEN_LEN} are allowed")]
    TooLong {
        /// What the name is for ("model", "tenant", ...).
        kind: &'static str,
        /// Its length, bytes.
        len: usize,
    },
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty {
        /// What the name is for ("model", "tenant", ...).
        kind: &'static str,
    },
    /// The name contains a character outside `[A-Za-z0-9_-]`.
    #[error("{kind} name {value:?} contains {bad:?}; only [A-Za-z0-9_-] are allowed")]
    InvalidChar {
        /// What the name is for ("model", "tenant", ...).
        kind: &'static str,
        /// The rejected name.
        value: String,
        /// The first offending character.
        bad: char,
    },
}

/// Checks that `s` is a safe subject token: non-empty, at most [`MAX_TOKEN_LEN`] bytes and
/// only `[A-Za-z0-9_-]`.
/// `kind` names the role of the token in the error message ("model", "tenant", ...).
pub fn validate_token(kind: &'static str, s: &str) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty { kind });
    }
    if s.len() > MAX_TOKEN_LEN {
        return Err(SubjectError::TooLong { kind, len: s.len() });
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some(bad) => Err(SubjectError::InvalidChar {
            kind,
            value: s.to_string(),
            bad,
        }),
        None => Ok(()),
    }
}

/// `faasmoe.v1.expert.<model>.<layer>.<expert>`: one routed expert of one MoE layer.
pub fn expert(model: &str, layer: u32, expert: u32) -> Result<String, SubjectError> {
    validate_token("model", model)?;
    Ok(format!("{PREFIX}.expert.{model}.{layer}.{expert}"))
}

/// `faasmoe.v1.expert.<model>.>`: every expert subject of `model`.
pub fn expert_wildcard(model: &str) -> Result<String, SubjectError> {
    validate_token("model", model)?;
    Ok(format!("{PREFIX}.expert.{model}.>"))
}

/// `faasmoe.v1.generate.<tenant>`: the client API of one tenant.
pub fn generate(tenant: &str) -> Result<String, SubjectError> {
    validate_token("tenant", tenant)?;
    Ok(format!("{PREFIX}.generate.{tenant}"))
}

/// `faasmoe.v1.generate.*`: the client API of every tenant (what a shared controller serves).
pub fn generate_wildcard() -> String {
    format!("{PREFIX}.generate.*")
}

/// `faasmoe.v1.activate.<model>`: activation requests to the broker for `model`'s functions.
pub fn activate(model: &str) -> Result<String, SubjectError> {
    validate_token("model", model)?;
    Ok(format!("{PREFIX}.activate.{model}"))
}

/// `faasmoe.v1.reply.<requester>`: the inbox prefix of a connection that sends requests to
/// the broker (activations) or to expert functions (`requester` the sender's id, made a valid
/// token with [`sanitize_token`]). The connection is opened with it as its inbox prefix
/// (async-nats `ConnectOptions::custom_inbox_prefix`, see
/// [`crate::connection::NatsArgs::connect_with_inbox_prefix`]), so its requests share one
/// multiplexed reply subscription `<prefix>.<nuid>.*` and each reply comes on
/// `<prefix>.<nuid>.<token>`: no subscribe and unsubscribe per request.
///
/// Why not an `_INBOX` reply: the broker and the workers may answer an `_INBOX` reply only
/// through the server's response permission (`allow_responses`), which nats-server forgets
/// when it reloads its configuration, as it does on every tenant change; a reply to a request
/// that was outstanding then was refused ("Permissions Violation for Publish to
/// _INBOX.controller…") and lost, and the requester waited its whole timeout (an activation
/// 60 s, an expert request 10 s, for every sequence of the step). `faasmoe.v1.reply.>` is an
/// explicit publish permission of the broker and the workers and a subscribe permission of
/// the controller (`nats.conf`), which a reload keeps; no tenant or gateway may read or
/// write it.
pub fn reply_prefix(requester: &str) -> String {
    format!("{PREFIX}.reply.{}", sanitize_token(requester))
}

/// Whether `subject` is a reply subject under a [`reply_prefix`]: two or three valid tokens
/// after `faasmoe.v1.reply` (`<requester>.<id>`, or
/// `<requester>.<nuid>.<token>` of a multiplexed request). The broker and the workers answer
/// only there or in an inbox.
pub fn is_reply(subject: &str) -> bool {
    subject
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix(".reply."))
        .is_some_and(|r| {
            let t: Vec<&str> = r.split('.').collect();
            (2..=3).contains(&t.len()) && t.iter().all(|t| validate_token("reply", t).is_ok())
        })
}

/// Whether a responder may answer on `reply`: a reply subject ([`is_reply`]) or an inbox
/// ([`is_inbox`]). The broker and the workers check it before replying, since they may also
/// publish to subjects (KV, JetStream API, events) that a reply set there would write.
pub fn is_answerable(reply: &str) -> bool {
    is_reply(reply) || is_inbox(reply)
}

/// `faasmoe.v1.events.<model>`: function lifecycle events of `model`.
pub fn events(model: &str) -> Result<String, SubjectError> {
    validate_token("model", model)?;
    Ok(format!("{PREFIX}.events.{model}"))
}

/// `faasmoe.v1.events.*`: lifecycle events of every model.
pub fn events_wildcard() -> String {
    format!("{PREFIX}.events.*")
}

/// `faasmoe.v1.admin.<verb>`: broker administration (tenants, functions).
pub fn admin(verb: &str) -> Result<String, SubjectError> {
    validate_token("admin verb", verb)?;
    Ok(format!("{PREFIX}.admin.{verb}"))
}

/// The NATS user of a tenant: `tenant-<tenant>` (the server grants it only the tenant's
/// generate subject and its own inbox, see `nats.conf`).
pub fn tenant_user(tenant: &str) -> Result<String, SubjectError> {
    validate_token("tenant", tenant)?;
    Ok(format!("tenant-{tenant}"))
}

/// The inbox prefix of a NATS user: `_INBOX.<user>` (e.g. `_INBOX.tenant-alice`,
/// `_INBOX.controller`).
///
/// Every user of the project's `nats.conf` may subscribe only under its own prefix, so no
/// user can read another's replies; clients must therefore create their inboxes under it
/// (async-nats `ConnectOptions::custom_inbox_prefix`, nats-py `inbox_prefix=`, nats.go
/// `nats.CustomInboxPrefix`, the `nats` CLI `--inbox-prefix`). [`crate::connection::connect`]
/// does it for every faasmoe process.
pub fn inbox_prefix(user: &str) -> Result<String, SubjectError> {
    validate_token("user", user)?;
    Ok(format!("{INBOX}.{user}"))
}

/// Whether `reply` is an inbox of `user` (under [`inbox_prefix`]`(user)` plus at least one
/// token): the controller answers a tenant only there, so a tenant cannot direct replies into
/// another user's inbox.
pub fn is_inbox_of(reply: &str, user: &str) -> bool {
    match inbox_prefix(user) {
        Ok(prefix) => reply
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|r| !r.is_empty()),
        Err(_) => false,
    }
}

/// Whether `reply` is under [`INBOX`] (any user's inbox): a reply there reaches at most the
/// user allowed to subscribe it, never a stream or KV subject.
pub fn is_inbox(reply: &str) -> bool {
    reply
        .strip_prefix(INBOX)
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|r| !r.is_empty())
}

/// NATS's conventional inbox root; [`inbox_prefix`] puts each user under it.
pub const INBOX: &str = "_INBOX";

/// The queue group that all instances of one function join (`faasmoe.v1.fn.<model>.<function_id>`),
/// so that NATS delivers each expert request to exactly one instance.
pub fn function_queue_group(model: &str, function_id: &str) -> Result<String, SubjectError> {
    validate_token("model", model)?;
    validate_token("function id", function_id)?;
    Ok(format!("{PREFIX}.fn.{model}.{function_id}"))
}

/// Parses a canonical decimal number (digits only, no sign).
fn parse_num(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits `subject` after `faasmoe.v1.<kind>.` and returns the remaining tokens.
fn tokens_after<'a>(subject: &'a str, kind: &str) -> Option<Vec<&'a str>> {
    let rest = subject
        .strip_prefix(PREFIX)?
        .strip_prefix('.')?
        .strip_prefix(kind)?
        .strip_prefix('.')?;
    Some(rest.split('.').collect())
}

/// Inverse of [`expert`]: `(model, layer, expert)`, or `None` for any other subject.
pub fn parse_expert(subject: &str) -> Option<(String, u32, u32)> {
    match tokens_after(subject, "expert")?.as_slice() {
        [model, layer, expert] if validate_token("model", model).is_ok() => {
            Some((model.to_string(), parse_num(layer)?, parse_num(expert)?))
        }
        _ => None,
    }
}

/// Inverse of [`generate`]: the tenant, or `None` for any other subject.
pub fn parse_generate(subject: &str) -> Option<String> {
    match tokens_after(subject, "generate")?.as_slice() {
        [tenant] if validate_token("tenant", tenant).is_ok() => Some(tenant.to_string()),
        _ => None,
    }
}

/// `faasmoe.v1.status.<model>.<function_id>`: the status endpoint of a function's instances
/// (NATS micro service endpoint; each instance answers with its stats as JSON).
pub fn status(model: &str, function_id: &str) -> Result<String, SubjectError> {
    validate_token("model", model)?;
    validate_token("function id", function_id)?;
    Ok(format!("{PREFIX}.status.{model}.{function_id}"))
}

/// The model id a checkpoint directory gets in subjects when none is given: its name (after
/// resolving `.` and symlinks) through [`sanitize_token`], e.g.
/// `/models/Qwen1.5-MoE-A2.7B` → `qwen1-5-moe-a2-7b`. The controller, the workers and the
/// broker all derive it here, so they agree without configuration.
pub fn model_id_for_dir(dir: &std::path::Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    sanitize_token(
        &dir.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// Turns any name (a checkpoint directory name such as `Qwen1.5-MoE-A2.7B`) into a valid
/// subject token: lowercase, every character outside `[a-z0-9_-]` replaced by `-`
/// (`qwen1-5-moe-a2-7b`), cut to [`MAX_TOKEN_LEN`] characters; empty input gives `model`.
pub fn sanitize_token(name: &str) -> String {
    let s: String = name
        .chars()
        .take(MAX_TOKEN_LEN)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() {
        "model".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inboxes_are_per_user_and_checked_by_whole_tokens() {
        assert_eq!(tenant_user("alice").unwrap(), "tenant-alice");
        assert_eq!(inbox_prefix("tenant-alice").unwrap(), "_INBOX.tenant-alice");
        assert!(is_inbox_of("_INBOX.tenant-alice.abc.1", "tenant-alice"));
        assert!(!is_inbox_of("_INBOX.tenant-alice", "tenant-alice"));
        assert!(!is_inbox_of("_INBOX.tenant-alice.", "tenant-alice"));
        assert!(!is_inbox_of("_INBOX.tenant-alicex.abc", "tenant-alice"));
        assert!(!is_inbox_of("_INBOX.abc", "tenant-alice"));
        assert!(!is_inbox_of("_INBOX.tenant-bob.x", "tenant-alice"));
        assert!(is_inbox("_INBOX.gateway.x") && is_inbox("_INBOX.abc"));
        assert!(
            !is_inbox("_INBOX.")
                && !is_inbox("_INBOXES.x")
                && !is_inbox("$KV.faasmoe_deployments.m")
        );
        assert!(inbox_prefix("a.b").is_err() && tenant_user("a b").is_err());
    }

    #[test]
    fn prefix_matches_protocol_version() {
        assert_eq!(PREFIX, format!("faasmoe.v{PROTOCOL_VERSION}"));
    }

    #[test]
    fn subjects_have_the_documented_form_and_parse_back() {
        let s = expert("qwen-moe_a", 3, 59).unwrap();
        assert_eq!(s, "faasmoe.v1.expert.qwen-moe_a.3.59");
        assert_eq!(parse_expert(&s), Some(("qwen-moe_a".into(), 3, 59)));
        assert_eq!(expert_wildcard("m").unwrap(), "faasmoe.v1.expert.m.>");
        let g = generate("acme").unwrap();
        assert_eq!(g, "faasmoe.v1.generate.acme");
        assert_eq!(parse_generate(&g), Some("acme".into()));
        assert_eq!(generate_wildcard(), "faasmoe.v1.generate.*");
        assert_eq!(activate("m").unwrap(), "faasmoe.v1.activate.m");
        assert_eq!(
            reply_prefix("Controller 1"),
            "faasmoe.v1.reply.controller-1"
        );
        assert!(is_reply("faasmoe.v1.reply.c.1"));
        // A multiplexed request's reply: `<prefix>.<nuid>.<token>`.
        assert!(is_reply("faasmoe.v1.reply.c.Hk0xQ2.5"));
        for bad in [
            "faasmoe.v1.reply.c",
            "faasmoe.v1.reply.c.1.2.3",
            "faasmoe.v1.reply.c.1.*",
            "faasmoe.v1.reply.c.*",
            "faasmoe.v1.reply.c.>",
            "$KV.faasmoe_tenants.x",
            "_INBOX.controller.x",
        ] {
            assert!(!is_reply(bad), "{bad}");
        }
        assert!(is_answerable("_INBOX.controller.x") && is_answerable("faasmoe.v1.reply.c.1"));
        for bad in ["$KV.faasmoe_tenants.x", "faasmoe.v1.events.m", "_INBOX"] {
            assert!(!is_answerable(bad), "{bad}");
        }
        assert_eq!(events("m").unwrap(), "faasmoe.v1.events.m");
        assert_eq!(events_wildcard(), "faasmoe.v1.events.*");
        assert_eq!(admin("add_tenant").unwrap(), "faasmoe.v1.admin.add_tenant");
        assert_eq!(
            function_queue_group("m", "l3-g0").unwrap(),
            "faasmoe.v1.fn.m.l3-g0"
        );
    }

    #[test]
    fn model_id_for_dir_is_the_sanitised_directory_name() {
        let tmp = std::env::temp_dir().join(format!("Qwen1.5-MoE-A2.7B-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("sub")).unwrap();
        let want = format!("qwen1-5-moe-a2-7b-{}", std::process::id());
        assert_eq!(model_id_for_dir(&tmp), want);
        assert_eq!(
            model_id_for_dir(&tmp.join("sub/..")),
            want,
            "resolved before naming"
        );
        assert_eq!(
            model_id_for_dir(std::path::Path::new("/no/such/Dir.X")),
            "dir-x"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn overlong_names_are_rejected_and_sanitized_ones_fit() {
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(validate_token("tenant", &"a".repeat(MAX_TOKEN_LEN)).is_ok());
        assert_eq!(
            generate(&long).unwrap_err(),
            SubjectError::TooLong {
                kind: "tenant",
                len: MAX_TOKEN_LEN + 1
            }
        );
        assert!(validate_token("model", &sanitize_token(&long)).is_ok());
    }

    #[test]
    fn unsafe_names_are_rejected() {
        for bad in ["a.b", "*", ">", "", "a b", "a\tb", "ü"] {
            assert!(validate_token("model", bad).is_err(), "{bad:?} accepted");
            assert!(expert(bad, 0, 0).is_err(), "{bad:?} accepted");
            assert!(generate(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            generate("").unwrap_err(),
            SubjectError::Empty { kind: "tenant" }
        );
        assert!(function_queue_group("m", "a.b").is_err());
    }

    #[test]
    fn parsers_reject_foreign_subjects() {
        for s in [
            "faasmoe.v2.expert.m.1.2",
            "faasmoe.v1.expert.m.1",
            "faasmoe.v1.expert.m.1.2.3",
            "faasmoe.v1.expert.m.+1.2",
            "faasmoe.v1.expert.m.x.2",
            "faasmoe.v1.expert.*.1.2",
            "faasmoe.v1.generate.m.1.2",
        ] {
            assert_eq!(parse_expert(s), None, "{s}");
        }
        for s in [
            "faasmoe.v1.generate.*",
            "faasmoe.v1.generate.a.b",
            "faasmoe.v1.generate",
            "faasmoe.v1.generatex.a",
        ] {
            assert_eq!(parse_generate(s), None, "{s}");
        }
    }
}
