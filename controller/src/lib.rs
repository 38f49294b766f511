//! stub
pub mod tokenizer;
