//! The engine: continuous batching across all tenants over one control plane.
//!
//! Every step runs one forward pass over the running sequences: decoding ones feed their
//! last token, prefilling ones a chunk of their prompt — prefill and decode in the same
//! step, sequences of different lengths together. New requests join at step boundaries,
//! admitted round-robin across tenants (one tenant's flood cannot starve another's single
//! request), up to a limit on running sequences.
//!
//! **Chunked prefill** (the prefill chunk budget of SGLang's `chunked_prefill_size`): while
//! any sequence decodes, a step holds at most [`EngineSettings::max_prefill_tokens`] prompt
//! tokens, and every decoding sequence adds its one token on top (so the prompts keep
//! moving however many sequences decode); when none decodes, the prompts share
//! [`EngineSettings::max_prefill_tokens_alone`] (no one's TPOT is at stake). Prompts still
//! prefilling take the budget oldest first; the oldest always gets at least one token, so a
//! step never stalls. A long prompt is thus prefilled over several steps while every running
//! sequence keeps decoding in each of them: its TTFT grows, everyone else's TPOT stays
//! bounded by the budget.
//!
//! With pipelining on and at least two sequences, the step is split into two micro-batches
//! driven concurrently: while one micro-batch's expert requests are in flight, the other's
//! attention runs (the ping-pong schedule of disaggregated MoE serving, MegaScale-Infer,
//! arXiv:2504.02263).
//!
//! The engine knows token ids only; text, stop strings and the wire format are the API's.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use faasmoe_model::control_plane::last_logits;
use faasmoe_model::{ControlPlane, KvCache, Step};
use faasmoe_telemetry::metrics;
use tokio::sync::mpsc;
use tracing::{debug, info_span, warn, Instrument};

use crate::dispatch::{Dispatch, DispatchContext, DispatchError};
use crate::sampling::{Sampler, SamplingParams};

/// Limits and switches of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Most sequences in one step.
    pub max_batch_seqs: usize,
    /// Most prompt tokens in a step while any running sequence decodes: the chunked-prefill
    /// budget that bounds their TPOT (see the module docs). Each decoding sequence adds its
    /// one token on top; the oldest prefilling prompt gets at least one token whatever the
    /// budget.
    pub max_prefill_tokens: usize,
    /// Most prompt tokens in a step in which no sequence decodes (no one's TPOT to protect,
    /// so a prompt alone is prefilled in few large steps); the larger of this and
    /// `max_prefill_tokens` applies.
    pub max_prefill_tokens_alone: usize,
    /// Split steps of ≥ 2 sequences into two pipelined micro-batches.
    pub pipeline: bool,
    /// Token ids that end a sequence.
    pub eos_token_ids: Vec<u32>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_batch_seqs: 32,
            max_prefill_tokens: Self::DEFAULT_MAX_PREFILL_TOKENS,
            max_prefill_tokens_alone: Self::DEFAULT_MAX_PREFILL_TOKENS_ALONE,
            pipeline: true,
            eos_token_ids: vec![],
        }
    }
}

impl EngineSettings {
    /// Default of [`EngineSettings::max_prefill_tokens`], chosen by measurement (issue 11's
    /// note; `faasmoe bench-prefill`: 4 decodes and a 4,096-token prompt on the demo
    /// checkpoint, 2 cores): the largest budget tried at which the decodes' TPOT p99 during
    /// the prefill stays within 3× their p99 alone: 8 → 2.28×, 12 → 2.29×, 16 → 4.96×
    /// (`--budgets 8,12,16`); the long prompt's TTFT at 12 is 76 s (102 s at 8, 30 s
    /// unchunked).
    pub const DEFAULT_MAX_PREFILL_TOKENS: usize = 12;

    /// Default of [`EngineSettings::max_prefill_tokens_alone`]: 256, where a prompt's TTFT
    /// was within 3% of the best budget tried (a 4,096-token prompt prefilled alone in 16
    /// steps instead of 342).
    pub const DEFAULT_MAX_PREFILL_TOKENS_ALONE: usize = 256;
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An EOS token.
    Eos,
    /// `max_tokens` or the context length reached.
    Length,
    /// Cancelled by the API (client gone, stop string).
    Cancelled,
}

/// What the engine reports about one sequence.
#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// The sequence was admitted into the running batch.
    Admitted,
    /// A new token.
    Token(u32),
    /// The sequence ended; no more events follow.
    Finished(Finish),
    /// A step failed; no more events follow.
    Failed(DispatchError),
}

/// A generation request for the engine.
#[derive(Debug)]
pub struct Submission {
    /// Request id (logs).
    pub id: String,
    /// Tenant (fair admission, logs).
    pub tenant: String,
    /// Prompt token ids (non-empty, each < vocab).
    pub prompt: Vec<u32>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Set by the API to stop the sequence at the next step.
    pub cancel: Arc<AtomicBool>,
    /// Where events go.
    pub events: mpsc::UnboundedSender<SeqEvent>,
    /// W3C `traceparent` of the request's span: engine steps are its children.
    pub traceparent: Option<String>,
}

/// A handle to submit work to a running engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Submission>,
}

impl EngineHandle {
    /// Queues a submission; `false` when the engine has stopped.
    pub fn submit(&self, s: Submission) -> bool {
        self.tx.send(s).is_ok()
    }
}

struct Seq {
    sub: Submission,
    cache: KvCache,
    sampler: Sampler,
    /// Tokens to feed at this step (planned by [`plan_step`]; empty: sits this step out).
    feed: Vec<u32>,
    /// The last sampled token, fed at the next step; `None` while the prompt prefills.
    next: Option<u32>,
    generated: usize,
    /// Tokens in the KV cache (prompt tokens prefilled, then generated ones fed).
    len: usize,
    /// Admission order (oldest first when the budget is shared out).
    admitted: u64,
}

impl Seq {
    /// Whether the prompt is fully prefilled.
    fn decoding(&self) -> bool {
        self.next.is_some()
    }
}

/// Publishes the batch's occupancy ([`metrics::RUNNING`], [`metrics::WAITING`]).
fn set_queue_gauges(running: usize, waiting: usize) {
    ::metrics::gauge!(metrics::RUNNING).set(running as f64);
    ::metrics::gauge!(metrics::WAITING).set(waiting as f64);
}

/// Plans one step (see the module docs): every decoding sequence feeds its last token, then
/// prefilling prompts in admission order take chunks of the prompt-token budget, the oldest
/// at least one token. The budget is [`EngineSettings::max_prefill_tokens`] if any sequence
/// decodes, else the larger of it and [`EngineSettings::max_prefill_tokens_alone`]. Returns
/// the tokens planned (decodes included).
fn plan_step(running: &mut [Seq], settings: &EngineSettings) -> usize {
    let budget = if running.iter().any(Seq::decoding) {
        settings.max_prefill_tokens
    } else {
        settings
            .max_prefill_tokens
            .max(settings.max_prefill_tokens_alone)
    };
    let mut left = budget.max(1);
    let mut total = 0;
    for s in running.iter_mut() {
        s.feed.clear();
        if let Some(t) = s.next {
            s.feed.push(t);
            total += 1;
        }
    }
    let mut prefilling: Vec<&mut Seq> = running.iter_mut().filter(|s| !s.decoding()).collect();
    prefilling.sort_by_key(|s| s.admitted);
    for (i, s) in prefilling.into_iter().enumerate() {
        let rest = s.sub.prompt.len() - s.len;
        let n = rest.min(left).max(usize::from(i == 0));
        s.feed.extend_from_slice(&s.sub.prompt[s.len..s.len + n]);
        left -= n.min(left);
        total += n;
    }
    total
}

/// Starts the engine on a dedicated thread (its compute must not stall the NATS runtime).
pub fn spawn(
    cp: Arc<ControlPlane>,
    dispatch: Arc<dyn Dispatch>,
    settings: EngineSettings,
) -> EngineHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("faasmoe-engine".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("engine runtime");
            rt.block_on(run(cp, dispatch, settings, rx));
        })
        .expect("engine thread");
    EngineHandle { tx }
}

async fn run(
    cp: Arc<ControlPlane>,
    dispatch: Arc<dyn Dispatch>,
    settings: EngineSettings,
    mut rx: mpsc::UnboundedReceiver<Submission>,
) {
    let mut waiting: BTreeMap<String, VecDeque<Submission>> = BTreeMap::new();
    let mut turn: VecDeque<String> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut step_no: u64 = 0;
    let mut admitted: u64 = 0;
    let max_pos = cp.config().max_position_embeddings;
    loop {
        if running.is_empty() && waiting.is_empty() {
            set_queue_gauges(0, 0);
            match rx.recv().await {
                Some(s) => enqueue(&mut waiting, &mut turn, s),
                None => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            enqueue(&mut waiting, &mut turn, s);
        }
        // Drop cancelled sequences.
        running.retain(|s| {
            let c = s.sub.cancel.load(Ordering::Relaxed);
            if c {
                let _ = s.sub.events.send(SeqEvent::Finished(Finish::Cancelled));
            }
            !c
        });
        // Admit round-robin across tenants.
        while running.len() < settings.max_batch_seqs {
            let Some(tenant) = turn.pop_front() else {
                break;
            };
            let q = waiting
                .get_mut(&tenant)
                .expect("tenant in turn has a queue");
            let sub = q.pop_front().expect("front exists");
            if q.is_empty() {
                waiting.remove(&tenant);
            } else {
                turn.push_back(tenant);
            }
            if sub.cancel.load(Ordering::Relaxed) {
                let _ = sub.events.send(SeqEvent::Finished(Finish::Cancelled));
                continue;
            }
            let _ = sub.events.send(SeqEvent::Admitted);
            admitted += 1;
            running.push(Seq {
                cache: cp.new_cache(),
                sampler: Sampler::new(sub.sampling.clone(), sub.seed),
                feed: Vec::new(),
                next: None,
                len: 0,
                generated: 0,
                admitted,
                sub,
            });
        }
        set_queue_gauges(running.len(), waiting.values().map(VecDeque::len).sum());
        if running.is_empty() {
            continue;
        }
        step_no += 1;
        let step_tokens = plan_step(&mut running, &settings);
        // Prefilling prompts left out of this step's budget wait for the next one.
        let (mut active, mut keep): (Vec<Seq>, Vec<Seq>) =
            running.drain(..).partition(|s| !s.feed.is_empty());
        let tenants: Vec<&str> = active.iter().map(|s| s.sub.tenant.as_str()).collect();
        let span = info_span!("engine.step", step = step_no, seqs = active.len(), tokens = step_tokens, waiting_prefill = keep.len(), tenants = %tenants.join(","));
        let results = step(&cp, dispatch.as_ref(), &mut active, settings.pipeline)
            .instrument(span)
            .await;
        // Sample and report.
        for (seq, r) in active.drain(..).zip(results) {
            let mut seq = seq;
            match r {
                Err(e) => {
                    warn!(request_id = %seq.sub.id, tenant = %seq.sub.tenant, error = %e, "step failed");
                    let _ = seq.sub.events.send(SeqEvent::Failed(e));
                }
                Ok(_) if seq.len + seq.feed.len() < seq.sub.prompt.len() => {
                    // A chunk of the prompt, not its end: nothing to sample yet.
                    seq.len += seq.feed.len();
                    keep.push(seq);
                }
                Ok(logits) => {
                    seq.len += seq.feed.len();
                    let t = seq.sampler.sample(&logits);
                    seq.generated += 1;
                    let _ = seq.sub.events.send(SeqEvent::Token(t));
                    let finish = if settings.eos_token_ids.contains(&t) {
                        Some(Finish::Eos)
                    } else if seq.generated >= seq.sub.max_tokens || seq.len + 1 >= max_pos {
                        Some(Finish::Length)
                    } else {
                        None
                    };
                    match finish {
                        Some(f) => {
                            debug!(request_id = %seq.sub.id, tokens = seq.generated, ?f, "sequence finished");
                            let _ = seq.sub.events.send(SeqEvent::Finished(f));
                        }
                        None => {
                            seq.next = Some(t);
                            keep.push(seq);
                        }
                    }
                }
            }
        }
        keep.sort_by_key(|s| s.admitted);
        running = keep;
    }
}

fn enqueue(
    waiting: &mut BTreeMap<String, VecDeque<Submission>>,
    turn: &mut VecDeque<String>,
    s: Submission,
) {
    let q = waiting.entry(s.tenant.clone()).or_default();
    if q.is_empty() {
        turn.push_back(s.tenant.clone());
    }
    q.push_back(s);
}

type StepResult = Vec<Result<Vec<f32>, DispatchError>>;

/// One step over all running sequences; per sequence the logits of its last fed token.
async fn step(
    cp: &ControlPlane,
    dispatch: &dyn Dispatch,
    running: &mut [Seq],
    pipeline: bool,
) -> StepResult {
    if pipeline && running.len() >= 2 {
        let mid = running.len() / 2;
        let (a, b) = running.split_at_mut(mid);
        let (ra, rb) =
            futures::future::join(micro_batch(cp, dispatch, a), micro_batch(cp, dispatch, b)).await;
        ra.into_iter().chain(rb).collect()
    } else {
        micro_batch(cp, dispatch, running).await
    }
}

async fn micro_batch(cp: &ControlPlane, dispatch: &dyn Dispatch, seqs: &mut [Seq]) -> StepResult {
    let n = seqs.len();
    match forward(cp, dispatch, seqs).await {
        Ok(rows) => rows.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e); n],
    }
}

async fn forward(
    cp: &ControlPlane,
    dispatch: &dyn Dispatch,
    seqs: &mut [Seq],
) -> Result<Vec<Vec<f32>>, DispatchError> {
    let feeds: Vec<(usize, Vec<u32>)> = seqs.iter().map(|s| (s.len, s.feed.clone())).collect();
    let batch: Vec<(usize, &[u32])> = feeds.iter().map(|(o, f)| (*o, f.as_slice())).collect();
    let mut tenants: Vec<&str> = seqs.iter().map(|s| s.sub.tenant.as_str()).collect();
    tenants.sort();
    tenants.dedup();
    let ctx = DispatchContext {
        tenants: tenants.join(","),
    };
    let span = tracing::info_span!("engine.micro_batch", seqs = seqs.len());
    if let Some(tp) = seqs.iter().find_map(|s| s.sub.traceparent.as_deref()) {
        faasmoe_telemetry::set_parent(&span, tp);
    }
    forward_in(cp, dispatch, seqs, &batch, &ctx)
        .instrument(span)
        .await
}

/// Rows of a pass that pre-gating looks at, at most (evenly spaced over a long prefill).
const PREDICT_MAX_ROWS: usize = 64;

/// Activation ahead of the pass: while this MoE layer's expert requests are out, predict
/// the experts of the layers the dispatcher asks for and hand them over. A failed
/// prediction is only logged: it never fails the pass.
fn prefetch_ahead(
    cp: &ControlPlane,
    dispatch: &dyn Dispatch,
    pass: &faasmoe_model::control_plane::ForwardPass,
) {
    let depth = dispatch.prefetch_depth();
    if depth == 0 {
        return;
    }
    match cp.predict_experts(pass, depth, PREDICT_MAX_ROWS) {
        Ok(predicted) => dispatch.prefetch(&predicted),
        Err(e) => debug!(error = %e, "pre-gating failed; no activation ahead"),
    }
}

async fn forward_in(
    cp: &ControlPlane,
    dispatch: &dyn Dispatch,
    seqs: &mut [Seq],
    batch: &[(usize, &[u32])],
    ctx: &DispatchContext,
) -> Result<Vec<Vec<f32>>, DispatchError> {
    let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut s.cache).collect();
    forward_batch(cp, dispatch, batch, &mut caches, ctx).await
}

/// One forward pass of the engine over a batch of sequences, the routed experts computed by
/// `dispatch`: `batch[i] = (offset, tokens)` feeds sequence `i` (cached positions, new
/// token ids) and appends to `caches[i]`. At each MoE layer the first poll of
/// [`Dispatch::routed`] sends the expert requests; the shared expert and the prediction of
/// later layers' experts ([`Dispatch::prefetch`]) then run here while the functions compute.
/// A dispatch ready at its first poll (the in-process one) leaves the shared expert to
/// [`ControlPlane::complete_moe`].
///
/// Returns, per sequence, the f32 logits `[vocab]` of its last fed token. Errors: a model
/// error (shapes, token ids, cache) as [`DispatchError::Model`], or the dispatch's own.
/// This is what every engine step runs per micro-batch; the bench's decode section times
/// it for local-split and faasmoe-shared alike.
pub async fn forward_batch(
    cp: &ControlPlane,
    dispatch: &dyn Dispatch,
    batch: &[(usize, &[u32])],
    caches: &mut [&mut KvCache],
    ctx: &DispatchContext,
) -> Result<Vec<Vec<f32>>, DispatchError> {
    let mut pass = cp.start(batch)?;
    let t0 = Instant::now();
    loop {
        match cp.advance(&mut pass, caches)? {
            Step::Experts(b) => {
                let mut routed = dispatch.routed(&b, ctx);
                let out = match futures::poll!(&mut routed) {
                    std::task::Poll::Ready(out) => out?,
                    std::task::Poll::Pending => {
                        cp.shared_expert(&mut pass)?;
                        prefetch_ahead(cp, dispatch, &pass);
                        routed.await?
                    }
                };
                cp.complete_moe(&mut pass, &out)?;
            }
            Step::Done(h) => {
                let logits = last_logits(cp, &pass, &h)?;
                debug!(
                    seqs = batch.len(),
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    "micro-batch done"
                );
                return Ok(logits.to_vec2::<f32>()?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence with a `prompt_len`-token prompt, `prefilled` of it in the cache, and (if
    /// `decoding`) its first token sampled.
    fn seq(prompt_len: usize, prefilled: usize, decoding: bool, admitted: u64) -> Seq {
        let sampling = SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        };
        let (events, _) = mpsc::unbounded_channel();
        Seq {
            sub: Submission {
                id: format!("s{admitted}"),
                tenant: "t".into(),
                prompt: vec![1; prompt_len],
                max_tokens: 4,
                sampling: sampling.clone(),
                seed: Some(0),
                cancel: Arc::new(AtomicBool::new(false)),
                events,
                traceparent: None,
            },
            cache: KvCache::new(1),
            sampler: Sampler::new(sampling, Some(0)),
            feed: Vec::new(),
            next: decoding.then_some(7),
            generated: usize::from(decoding),
            len: prefilled,
            admitted,
        }
    }

    fn settings(step: usize, prefill: usize) -> EngineSettings {
        EngineSettings {
            max_prefill_tokens: step,
            max_prefill_tokens_alone: prefill,
            ..EngineSettings::default()
        }
    }

    #[test]
    fn decodes_feed_one_token_each_and_the_oldest_prompt_takes_the_budget() {
        let mut running = vec![
            seq(100, 0, false, 2),
            seq(5, 5, true, 0),
            seq(50, 10, false, 1),
        ];
        assert_eq!(plan_step(&mut running, &settings(16, 256)), 17);
        assert_eq!(running[1].feed, vec![7]);
        // The older prompt (admitted 1) takes the whole prompt budget; the younger none.
        assert_eq!(running[2].feed.len(), 16);
        assert!(running[0].feed.is_empty());
    }

    #[test]
    fn prompts_keep_their_budget_however_many_sequences_decode() {
        let mut running: Vec<Seq> = (0..32).map(|i| seq(3, 3, true, i)).collect();
        running.push(seq(1000, 0, false, 40));
        assert_eq!(plan_step(&mut running, &settings(12, 256)), 32 + 12);
        assert_eq!(running[32].feed.len(), 12);
    }

    #[test]
    fn prompts_alone_get_the_alone_budget_and_never_less_than_the_other() {
        let mut running = vec![seq(4096, 0, false, 0)];
        assert_eq!(plan_step(&mut running, &settings(16, 256)), 256);
        assert_eq!(plan_step(&mut running, &settings(1024, 256)), 1024);
        // Two prompts alone share it, oldest first.
        let mut running = vec![seq(300, 0, false, 1), seq(200, 0, false, 0)];
        assert_eq!(plan_step(&mut running, &settings(16, 256)), 256);
        assert_eq!((running[1].feed.len(), running[0].feed.len()), (200, 56));
    }

    #[test]
    fn the_oldest_prompt_moves_even_with_a_zero_budget() {
        let mut running = vec![seq(3, 3, true, 0), seq(9, 0, false, 2), seq(9, 0, false, 1)];
        assert_eq!(plan_step(&mut running, &settings(0, 0)), 2);
        assert_eq!((running[2].feed.len(), running[1].feed.len()), (1, 0));
    }
}
