//! Chunked prefill against transformers' greedy tokens: whatever the per-step token budget,
//! prompts prefilled over several steps (while other sequences decode in the same steps)
//! give exactly the golden continuation; and a long prompt no longer stalls the decodes
//! already running.
//!
//! The engine runs in-process over the in-process experts (no NATS needed). Fixtures:
//! `$FAASMOE_FIXTURES`, else `../shared/fixtures`; when absent each test says SKIPPED.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use faasmoe_controller::dispatch::LocalDispatch;
use faasmoe_controller::engine::{
    self, EngineHandle, EngineSettings, Finish, SeqEvent, Submission,
};
use faasmoe_controller::sampling::SamplingParams;
use faasmoe_model::fixtures::fixture;
use tokio::sync::mpsc;

const FIXTURES: [&str; 2] = ["qwen15-moe-tiny", "qwen2-moe-gqa-mixed"];

fn ids(golden: &std::collections::HashMap<String, candle_core::Tensor>, key: &str) -> Vec<u32> {
    golden[key]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// A golden case: prompt ids and transformers' greedy continuation.
type Case = (Vec<u32>, Vec<u32>);
/// An engine over the fixture with the given budget (no EOS, no pipelining: the golden
/// continuations run to 24 tokens), and the fixture's four (prompt, greedy) pairs.
fn engine(name: &str, budget: usize, pipeline: bool) -> Option<(EngineHandle, Vec<Case>)> {
    let Some(dir) = fixture(name) else {
        eprintln!("!!! SKIPPED: fixture {name} not found");
        return None;
    };
    let golden =
        candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let cases = (0..4)
        .map(|i| {
            (
                ids(&golden, &format!("prompt.{i}.input_ids")),
                ids(&golden, &format!("prompt.{i}.greedy_ids")),
            )
        })
        .collect();
    let (cp, backend) = faasmoe_model::load_local(&dir, DType::F32).unwrap();
    let settings = EngineSettings {
        max_batch_seqs: 32,
        max_prefill_tokens: budget,
        max_prefill_tokens_alone: budget,
        pipeline,
        eos_token_ids: vec![],
    };
    Some((
        engine::spawn(Arc::new(cp), Arc::new(LocalDispatch(backend)), settings),
        cases,
    ))
}

fn submit(
    engine: &EngineHandle,
    id: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> mpsc::UnboundedReceiver<SeqEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    assert!(engine.submit(Submission {
        id: id.into(),
        tenant: format!("t-{id}"),
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0
        },
        seed: None,
        cancel: Arc::new(AtomicBool::new(false)),
        events: tx,
        traceparent: None,
    }));
    rx
}

/// The generated tokens of a sequence, which must end with `Length`.
async fn tokens(rx: &mut mpsc::UnboundedReceiver<SeqEvent>) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            SeqEvent::Admitted => {}
            SeqEvent::Token(t) => out.push(t),
            SeqEvent::Finished(f) => {
                assert_eq!(f, Finish::Length);
                return out;
            }
            SeqEvent::Failed(e) => panic!("sequence failed: {e}"),
        }
    }
    panic!("events ended without Finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_prefilled_in_chunks_give_the_golden_tokens_at_budgets_1_3_and_7() {
    for name in FIXTURES {
        for budget in [1, 3, 7] {
            for pipeline in [false, true] {
                let Some((engine, cases)) = engine(name, budget, pipeline) else {
                    return;
                };
                // All four at once: chunks of several prompts share steps with decodes.
                let mut rxs: Vec<_> = cases
                    .iter()
                    .enumerate()
                    .map(|(i, (p, g))| submit(&engine, &i.to_string(), p.clone(), g.len()))
                    .collect();
                for (i, ((prompt, greedy), rx)) in cases.iter().zip(rxs.iter_mut()).enumerate() {
                    let got = tokens(rx).await;
                    assert_eq!(
                        &got,
                        greedy,
                        "{name}, budget {budget}, pipeline {pipeline}: prompt {i} ({} tokens)",
                        prompt.len()
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_does_not_stall_the_running_decodes() {
    let budget = 16;
    let Some((engine, cases)) = engine(FIXTURES[0], budget, false) else {
        return;
    };
    let (short, greedy) = cases[0].clone();
    let mut short_rx = submit(&engine, "short", short.clone(), greedy.len());
    // 600 tokens: ≥ 37 steps of prefill at this budget; unchunked it would take one step,
    // and the short sequence would wait for all of it.
    let long: Vec<u32> = cases
        .iter()
        .flat_map(|(p, _)| p.clone())
        .cycle()
        .take(600)
        .collect();
    let mut long_rx = submit(&engine, "long", long, 4);
    // Wait for the long prompt's first token. The engine sends events in step order, so
    // every token the short sequence got in an earlier step is in its channel by now.
    loop {
        match long_rx.recv().await.expect("long events") {
            SeqEvent::Token(_) => break,
            SeqEvent::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    let mut short_tokens = Vec::new();
    let mut finished = false;
    while let Ok(ev) = short_rx.try_recv() {
        match ev {
            SeqEvent::Token(t) => short_tokens.push(t),
            SeqEvent::Finished(_) => finished = true,
            SeqEvent::Failed(e) => panic!("{e}"),
            SeqEvent::Admitted => {}
        }
    }
    assert!(
        finished,
        "the short sequence had {} of its {} tokens when the long prompt's first token came",
        short_tokens.len(),
        greedy.len()
    );
    assert_eq!(
        short_tokens, greedy,
        "the short sequence's tokens while the long prompt prefilled"
    );
}
