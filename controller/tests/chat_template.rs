//! Chat rendering with the checkpoint's own `chat_template` (minijinja) against
//! `../shared/fixtures/chat-template-golden.json` (rendered by transformers): every case
//! gives the same prompt ids, its error cases are refused, and roles outside OpenAI's set are
//! refused before any template runs (as the API does with [`CHAT_ROLES`]).

use faasmoe_controller::api::CHAT_ROLES;
use faasmoe_controller::tokenizer::{QwenTokenizer, TokenizerError};
use faasmoe_model::fixtures::{fixture, fixtures_dir};
use serde_json::Value;

#[test]
fn every_golden_chat_template_case_gives_the_transformers_prompt_ids() {
    let (Some(dir), Some(model)) = (fixtures_dir(), fixture("qwen15-moe-tiny")) else {
        eprintln!("!!! SKIPPED: fixtures not found");
        return;
    };
    let golden: Value =
        serde_json::from_slice(&std::fs::read(dir.join("chat-template-golden.json")).unwrap())
            .unwrap();
    let base = QwenTokenizer::from_checkpoint_dir(&model).unwrap();
    assert!(
        base.has_chat_template(),
        "the fixture checkpoint has a chat_template"
    );
    let cases = golden["cases"].as_array().unwrap();
    let (mut matched, mut refused) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        let name = case["template"].as_str().unwrap();
        let template = golden["templates"][name].as_str().unwrap().to_string();
        let tok = base.clone().with_chat_template(Some(template));
        let pairs: Vec<(String, String)> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let outside_roles = pairs.iter().any(|(r, _)| !CHAT_ROLES.contains(&r.as_str()));
        if let Some(err) = case.get("error").and_then(Value::as_str) {
            match tok.render_messages(&pairs) {
                Err(TokenizerError::Template(m)) => {
                    assert!(m.contains(err), "case {i}: {m:?} does not say {err:?}")
                }
                other => panic!("case {i} ({name}) must fail with {err:?}, got {other:?}"),
            }
            refused += 1;
            continue;
        }
        if outside_roles {
            // The API refuses it before the template (allowed by the fixture's README).
            refused += 1;
            continue;
        }
        let text = tok.render_messages(&pairs).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case {i} ({name}) text"
        );
        let ids = tok.encode(&text).unwrap();
        let want: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "case {i} ({name}) ids");
        matched += 1;
    }
    assert_eq!(matched + refused, cases.len());
    assert!(matched >= 15, "{matched} cases matched");
}

#[test]
fn a_template_syntax_error_is_a_template_error_and_no_template_falls_back_to_chatml() {
    let Some(model) = fixture("qwen15-moe-tiny") else {
        eprintln!("!!! SKIPPED: fixtures not found");
        return;
    };
    let tok = QwenTokenizer::from_checkpoint_dir(&model).unwrap();
    let bad = tok
        .clone()
        .with_chat_template(Some("{% for m in messages %}".into()));
    assert!(matches!(
        bad.render_messages(&[("user", "hi")]),
        Err(TokenizerError::Template(_))
    ));
    let plain = tok.with_chat_template(None);
    assert_eq!(
        plain.render_messages(&[("user", "hi")]).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}
