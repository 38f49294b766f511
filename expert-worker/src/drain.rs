//! Taking an instance out of its queue group without losing a request, and without waiting
//! on a server that is gone.
//!
//! # How the drain works
//!
//! A request the server routed to this instance before it processed the instance's UNSUB is
//! on its way to the instance and must still be answered. The standard fence is a round trip
//! after the UNSUB: the server handles one connection's protocol operations in order, and
//! queues everything it routed to the subscription before processing the UNSUB ahead of its
//! answer to anything sent after it; so once that answer is back, every such request is in
//! the client. async-nats 0.51 has no such drain: `Subscriber::unsubscribe` and
//! `Subscriber::drain` remove the subscription from the connection handler as soon as the
//! UNSUB is written (`drain` one poll later), `Client::flush` only writes the socket, and a
//! message that then arrives for the removed subscription is dropped (its requester times
//! out). So [`Intake`] does it around async-nats, with public API only:
//!
//! 1. **UNSUB, keep receiving.** [`Subscriber::unsubscribe_after`]`(`[`UNSUB_KEEP_RECEIVING`]`)`
//!    on every subscription. async-nats keeps the subscription (it would only remove it after
//!    that many messages) and writes `UNSUB <sid> 18446744073709551615`. nats-server reads a
//!    max of more than 9 digits as none (`parseSize` returns -1, `processUnsub` then
//!    unsubscribes when `max <= 0`) and removes the subscription at once: it routes nothing
//!    more to this instance (a request racing it goes to another instance of the queue group
//!    or, with none left, gets "no responders" at once). The test
//!    `unsub_with_an_oversized_max_stops_routing_but_keeps_receiving` checks this against the
//!    real server. After a reconnect async-nats re-sends SUB followed by the same kind of
//!    UNSUB, so the drain holds across one too.
//! 2. **Round trip.** [`fence`]: a request on the same connection to the function's status
//!    subject (`faasmoe.v1.status.<model>.<function>`, which the instance serves itself and
//!    may publish to). Any answer counts, including "no responders": the server produced it
//!    after processing the UNSUBs, so everything it routed to them is already in the client
//!    (the connection handler delivers in order). Meanwhile requests keep being forwarded.
//! 3. **Close the receiving side.** [`Subscriber::unsubscribe`] (which also closes the
//!    subscription's channel), then forward what the channels still hold until they end.
//!
//! The batching loop answers everything forwarded, then the worker exits.
//!
//! Every NATS call of the drain is bounded ([`STEP_TIMEOUT`], [`FENCE_TIMEOUT`]): with the
//! server gone, async-nats queues commands while it tries to reconnect and a wait on one
//! would never end. The round trip is skipped when the connection is down (nothing can
//! arrive then), and the drain then only forwards what had already arrived.

use std::time::{Duration, Instant};

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use async_nats::{Client, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// The `max` of the UNSUB that takes a subscription out of the server while async-nats keeps
/// delivering to it: async-nats would remove the subscription only after this many messages
/// (never); nats-server reads a max of more than 9 digits as none and unsubscribes at once.
pub const UNSUB_KEEP_RECEIVING: u64 = u64::MAX;

/// Longest wait for one command of the drain or exit to be accepted by the client (it waits
/// only when the client's command queue is full, i.e. the connection is down).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait for the answer of a [`fence`] round trip. Generous: a loaded machine may
/// take a while, and past it the drain can no longer promise that nothing was lost.
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a [`fence`] round trip did not confirm anything.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The connection was down, so the round trip was not tried.
    #[error("not connected to NATS ({0:?})")]
    NotConnected(State),
    /// No answer within the bound.
    #[error("no answer to the round trip within {0:?}")]
    TimedOut(Duration),
    /// The request failed (connection lost, timed out in the client).
    #[error("round trip request failed")]
    Request(#[source] async_nats::RequestError),
}

/// One round trip through the server on `client`'s connection: a request to `subject`,
/// bounded by `within`. On success, the server has processed every operation `client` sent
/// before, and everything it had routed to `client` before that has been delivered to
/// `client`'s subscriptions. Returns how long it took.
///
/// Any answer counts, "no responders" included (the server sends it while processing the
/// request). `subject` should be one the connection may publish to and where an answer (or
/// none) comes at once, e.g. the function's status subject.
///
/// Errors: [`FenceError`]: not connected (not tried), no answer within `within`, or the
/// request failed.
pub async fn fence(
    client: &Client,
    subject: &str,
    within: Duration,
) -> Result<Duration, FenceError> {
    let state = client.connection_state();
    if state != State::Connected {
        return Err(FenceError::NotConnected(state));
    }
    let t0 = Instant::now();
    match tokio::time::timeout(within, client.request(subject.to_string(), Bytes::new())).await {
        Err(_) => Err(FenceError::TimedOut(within)),
        Ok(Ok(_)) => Ok(t0.elapsed()),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Ok(t0.elapsed()),
        Ok(Err(e)) => Err(FenceError::Request(e)),
    }
}

/// How a drain went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DrainReport {
    /// Whether the drain ran (`false`: the subscriptions ended or the consumer went away
    /// before it was asked for).
    pub drained: bool,
    /// Whether the server confirmed the unsubscriptions by a [`fence`] round trip (`false`:
    /// the connection was down or did not answer in time; what had arrived was still
    /// forwarded).
    pub confirmed: bool,
    /// Requests forwarded after the drain began.
    pub forwarded_after_stop: u64,
    /// Duration of the whole drain, ms.
    pub drain_ms: f64,
}

/// The instance's intake: owns the expert subscriptions, forwards every request to the
/// batching loop, and drains on request.
pub struct Intake {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<DrainReport>,
}

impl Intake {
    /// Starts forwarding the messages of `subs` to `tx`. On [`Intake::drain`], takes them out
    /// of the server as described in the [module docs](self), using a round trip to
    /// `fence_subject` on `client` (the connection of `subs`), then drops `tx` once every
    /// request delivered before is forwarded.
    pub fn start(
        client: Client,
        subs: Vec<Subscriber>,
        tx: mpsc::Sender<Message>,
        fence_subject: String,
    ) -> Intake {
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(forward(client, subs, tx, stop_rx, fence_subject));
        Intake {
            stop: Some(stop_tx),
            task,
        }
    }

    /// Asks for the drain (once; later calls do nothing). Returns at once: the batching loop
    /// sees its channel end when the drain is over.
    pub fn drain(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the intake to end (after [`Intake::drain`], or when every subscription
    /// ended or the consumer went away) and says how the drain went.
    pub async fn finished(self) -> DrainReport {
        drop(self.stop);
        self.task.await.unwrap_or_default()
    }
}

async fn forward(
    client: Client,
    subs: Vec<Subscriber>,
    tx: mpsc::Sender<Message>,
    mut stop: oneshot::Receiver<()>,
    fence_subject: String,
) -> DrainReport {
    let mut report = DrainReport::default();
    let mut subs = futures::stream::select_all(subs);
    // Serving. (A dropped stop sender also means drain: the worker is ending.)
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            m = subs.next() => match m {
                Some(m) => {
                    if tx.send(m).await.is_err() {
                        return report;
                    }
                }
                None => {
                    warn!("every expert subscription ended (connection closed)");
                    return report;
                }
            },
        }
    }
    let started = Instant::now();
    report.drained = true;

    // 1. The server stops routing to this instance; the client keeps receiving.
    for sub in subs.iter_mut() {
        match tokio::time::timeout(STEP_TIMEOUT, sub.unsubscribe_after(UNSUB_KEEP_RECEIVING)).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "drain: UNSUB not sent"),
            Err(_) => {
                warn!(timeout = ?STEP_TIMEOUT, "drain: UNSUB not accepted by the client in time (connection down?)")
            }
        }
    }

    // 2. Round trip, forwarding what arrives meanwhile (through a local queue, so that a
    //    busy batching loop does not hold up the round trip).
    let mut pending = std::collections::VecDeque::new();
    let fenced = {
        let round_trip = fence(&client, &fence_subject, FENCE_TIMEOUT);
        tokio::pin!(round_trip);
        loop {
            tokio::select! {
                r = &mut round_trip => break r,
                Some(m) = subs.next(), if !subs.is_empty() => pending.push_back(m),
                permit = tx.reserve(), if !pending.is_empty() => match permit {
                    Ok(permit) => {
                        report.forwarded_after_stop += 1;
                        permit.send(pending.pop_front().expect("not empty"));
                    }
                    Err(_) => return report,
                },
            }
        }
    };
    for m in pending {
        report.forwarded_after_stop += 1;
        if tx.send(m).await.is_err() {
            return report;
        }
    }
    match &fenced {
        Ok(rtt) => {
            report.confirmed = true;
            info!(
                round_trip_ms = rtt.as_secs_f64() * 1e3,
                "drain: the server confirmed the unsubscriptions"
            );
        }
        Err(e) => warn!(error = %e, "drain: unconfirmed; forwarding what has arrived"),
    }

    // 3. Close the receiving side, forward what the channels still hold.
    for sub in subs.iter_mut() {
        match tokio::time::timeout(STEP_TIMEOUT, sub.unsubscribe()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "drain: final UNSUB not sent"),
            Err(_) => {
                warn!(timeout = ?STEP_TIMEOUT, "drain: final UNSUB not accepted by the client in time (connection down?)")
            }
        }
    }
    // A fresh set: closing a channel wakes nobody, and `SelectAll` polls only the streams
    // that were woken, so the old set would not see the closed ones end.
    let mut subs = futures::stream::select_all(subs);
    loop {
        // Closed channels end at once after their last message; the bound is for one whose
        // close was not accepted (connection down).
        match tokio::time::timeout(STEP_TIMEOUT, subs.next()).await {
            Ok(Some(m)) => {
                report.forwarded_after_stop += 1;
                if tx.send(m).await.is_err() {
                    return report;
                }
            }
            Ok(None) => break,
            Err(_) => {
                warn!(
                    left = subs.len(),
                    "drain: subscriptions did not end; stopping"
                );
                break;
            }
        }
    }
    report.drain_ms = started.elapsed().as_secs_f64() * 1e3;
    report
}
