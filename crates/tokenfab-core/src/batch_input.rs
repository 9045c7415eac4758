//! Parsing and validation of batch input files in the OpenAI Batch JSONL format.
//!
//! Each non-blank line (blank: only spaces, tabs, carriage returns or form feeds) is one
//! request:
//!
//! ```json
//! {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
//!  "body": {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}
//! ```
//!
//! As in the OpenAI Batch API, a malformed line fails alone: it becomes a [`LineError`]
//! (with its 1-based line number) in the batch's error output, and the valid lines run.
//! Problems with the file as a whole (empty, too large, no valid line, or any invalid line
//! when the tenant asked for a strict batch) refuse the batch with an [`InputError`].

use crate::ids::ModelId;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::fmt;

/// Limits on batch input, configurable on the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputLimits {
    /// Largest input file, bytes. OpenAI's Batch API allows 200 MB.
    pub max_file_bytes: u64,
    /// Largest single line (one request), bytes.
    pub max_line_bytes: usize,
    /// Most requests (non-blank lines) in one batch.
    pub max_requests: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_file_bytes: 200 * 1024 * 1024,
            max_line_bytes: 1024 * 1024,
            max_requests: 100_000,
        }
    }
}

/// The OpenAI endpoints a batch request may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
}

impl Endpoint {
    pub const ALL: [Endpoint; 2] = [Endpoint::ChatCompletions, Endpoint::Completions];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }

    pub fn from_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// One valid request of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParsedRequest {
    /// 1-based line in the input file.
    pub line: u32,
    pub custom_id: String,
    pub endpoint: Endpoint,
    /// The request body, JSON text exactly as given.
    pub body: String,
    /// Rough prompt size for scheduling (body bytes / 4). Never billed: billing uses the
    /// engine's own `usage` counts.
    pub prompt_tokens_estimate: u32,
    /// `max_tokens` or `max_completion_tokens`, if the body sets one.
    pub max_tokens: Option<u32>,
}

/// Why one line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LineErrorCode {
    InvalidUtf8,
    InvalidJson,
    NotAnObject,
    MissingCustomId,
    InvalidCustomId,
    DuplicateCustomId,
    InvalidMethod,
    InvalidUrl,
    MissingBody,
    InvalidBody,
    ModelMismatch,
    LineTooLarge,
}

impl LineErrorCode {
    /// The stable code shown to tenants (`invalid_json`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            LineErrorCode::InvalidUtf8 => "invalid_utf8",
            LineErrorCode::InvalidJson => "invalid_json",
            LineErrorCode::NotAnObject => "not_an_object",
            LineErrorCode::MissingCustomId => "missing_custom_id",
            LineErrorCode::InvalidCustomId => "invalid_custom_id",
            LineErrorCode::DuplicateCustomId => "duplicate_custom_id",
            LineErrorCode::InvalidMethod => "invalid_method",
            LineErrorCode::InvalidUrl => "invalid_url",
            LineErrorCode::MissingBody => "missing_body",
            LineErrorCode::InvalidBody => "invalid_body",
            LineErrorCode::ModelMismatch => "model_mismatch",
            LineErrorCode::LineTooLarge => "line_too_large",
        }
    }
}

/// A refused line: where, what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// 1-based line number in the input file.
    pub line: u32,
    pub code: LineErrorCode,
    /// The line's `custom_id`, when it could be read.
    pub custom_id: Option<String>,
    /// Full message, starting with `line N:`.
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A batch refused as a whole.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("the input file is empty: a batch needs at least one JSONL line, one request per line")]
    Empty,
    #[error("the input file is {bytes} bytes, over the limit of {limit} bytes; split it into several batches")]
    TooLarge { bytes: u64, limit: u64 },
    #[error(
        "the input file has more than {limit} requests (line {line} is request {count}); split it into several batches"
    )]
    TooManyRequests { count: usize, limit: usize, line: u32 },
    #[error("no valid request in the input ({} invalid lines): {}", .total, summarize(.errors))]
    NoValidLines { errors: Vec<LineError>, total: usize },
    #[error("strict batch refused: {total} of its lines are invalid: {}", summarize(.errors))]
    StrictRefused { errors: Vec<LineError>, total: usize },
}

/// The errors shown in an [`InputError`] message (the rest are counted).
const ERRORS_IN_MESSAGE: usize = 5;

fn summarize(errors: &[LineError]) -> String {
    let mut parts: Vec<&str> = errors
        .iter()
        .take(ERRORS_IN_MESSAGE)
        .map(|e| e.message.as_str())
        .collect();
    if errors.len() > ERRORS_IN_MESSAGE {
        parts.push("...");
    }
    parts.join("; ")
}

/// The valid requests and the refused lines of one input file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedInput {
    pub requests: Vec<ParsedRequest>,
    pub line_errors: Vec<LineError>,
    /// Non-blank lines in the file (= requests + line errors).
    pub lines: u32,
    pub bytes: u64,
}

#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(borrow)]
    custom_id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<&'a RawValue>,
    #[serde(borrow)]
    url: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct BodyPeek {
    model: Option<serde_json::Value>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    messages: Option<Vec<IgnoredAny>>,
    prompt: Option<IgnoredAny>,
    stream: Option<bool>,
}

/// Shortest shared prefix worth routing for, in estimated tokens: below this a cache hit
/// saves less than the imbalance affinity may cost.
pub const MIN_SHARED_PREFIX_TOKENS: u32 = 64;

#[derive(Deserialize)]
struct MessagesPeek<'a> {
    #[serde(borrow)]
    messages: Option<Vec<&'a RawValue>>,
}

/// The prompt prefix a chat request shares with others: every message but the last (a
/// system prompt, few-shot examples, a document questions are asked about), as a key
/// (FNV-1a of their JSON text) and an estimate of its tokens (bytes / 4). `None` for
/// completions, for a single message and for prefixes under
/// [`MIN_SHARED_PREFIX_TOKENS`]. Engines with a prefix cache (vLLM's automatic prefix
/// caching, llama.cpp's slot reuse, SGLang's radix cache) skip the prefill of a prefix
/// they hold; agents route requests with one key to one replica so that they do.
pub fn shared_prefix(body: &str) -> Option<(u64, u32)> {
    let peek: MessagesPeek = serde_json::from_str(body).ok()?;
    let messages = peek.messages?;
    let (_, head) = messages.split_last()?;
    let bytes: usize = head.iter().map(|m| m.get().len()).sum();
    let tokens = u32::try_from(bytes / 4).unwrap_or(u32::MAX);
    if head.is_empty() || tokens < MIN_SHARED_PREFIX_TOKENS {
        return None;
    }
    // FNV-1a, 64-bit: stable across builds and processes (agents and emulators agree).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for m in head {
        for b in m.get().bytes().chain([b'\n']) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Some((h, tokens))
}

/// Longest `custom_id` accepted, bytes.
pub const MAX_CUSTOM_ID_BYTES: usize = 512;

/// Parses and validates a whole input file for a batch on `model`.
pub fn parse_batch_input(
    input: &[u8],
    model: &ModelId,
    limits: &InputLimits,
    strict: bool,
) -> Result<ParsedInput, InputError> {
    let bytes = input.len() as u64;
    if bytes > limits.max_file_bytes {
        return Err(InputError::TooLarge {
            bytes,
            limit: limits.max_file_bytes,
        });
    }
    let mut out = ParsedInput {
        bytes,
        ..ParsedInput::default()
    };
    let mut first_line_of: BTreeMap<String, u32> = BTreeMap::new();
    for (i, raw) in input.split(|&b| b == b'\n').enumerate() {
        let line_no = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.lines += 1;
        if out.lines as usize > limits.max_requests {
            return Err(InputError::TooManyRequests {
                count: out.lines as usize,
                limit: limits.max_requests,
                line: line_no,
            });
        }
        match parse_line(raw, line_no, model, limits) {
            Ok(req) => {
                // A duplicate is refused on its second (and later) appearance.
                if let Some(&first) = first_line_of.get(&req.custom_id) {
                    let what = format!(
                        "custom_id \"{}\" is already used on line {first}; every request needs its own custom_id",
                        req.custom_id
                    );
                    out.line_errors.push(line_error(
                        line_no,
                        LineErrorCode::DuplicateCustomId,
                        Some(req.custom_id),
                        what,
                    ));
                } else {
                    first_line_of.insert(req.custom_id.clone(), line_no);
                    out.requests.push(req);
                }
            }
            Err(e) => out.line_errors.push(e),
        }
    }
    if out.lines == 0 {
        return Err(InputError::Empty);
    }
    let total = out.line_errors.len();
    if out.requests.is_empty() {
        return Err(InputError::NoValidLines {
            errors: out.line_errors,
            total,
        });
    }
    if strict && total > 0 {
        return Err(InputError::StrictRefused {
            errors: out.line_errors,
            total,
        });
    }
    Ok(out)
}

/// A serde_json error located by its column in the line (`offset` = where the parsed
/// text starts in the line), instead of serde's position inside the fragment.
fn json_error_at(e: &serde_json::Error, offset: usize) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let bare = full.strip_suffix(&suffix).unwrap_or(&full);
    format!("{bare} at column {}", offset + e.column())
}

fn line_error(line: u32, code: LineErrorCode, custom_id: Option<String>, what: String) -> LineError {
    LineError {
        line,
        code,
        custom_id,
        message: format!("line {line}: {what}"),
    }
}

fn parse_line(raw: &[u8], line: u32, model: &ModelId, limits: &InputLimits) -> Result<ParsedRequest, LineError> {
    if raw.len() > limits.max_line_bytes {
        return Err(line_error(
            line,
            LineErrorCode::LineTooLarge,
            None,
            format!(
                "the request is {} bytes, over the limit of {} bytes per line; shorten the prompt",
                raw.len(),
                limits.max_line_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(raw).map_err(|e| {
        line_error(
            line,
            LineErrorCode::InvalidUtf8,
            None,
            format!("not valid UTF-8 (byte {}); save the file as UTF-8", e.valid_up_to() + 1),
        )
    })?;
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        let what = if serde_json::from_str::<IgnoredAny>(text).is_ok() {
            (LineErrorCode::NotAnObject, "the line is JSON but not an object; each line must be one JSON object with custom_id, method, url and body".to_string())
        } else {
            let e = serde_json::from_str::<IgnoredAny>(text).unwrap_err();
            (
                LineErrorCode::InvalidJson,
                format!(
                    "not valid JSON ({}); each line must be one JSON object",
                    json_error_at(&e, 0)
                ),
            )
        };
        return Err(line_error(line, what.0, None, what.1));
    }
    let parsed: RawLine<'_> = serde_json::from_str(text).map_err(|e| {
        let what = format!(
            "not valid JSON ({}); each line must be one JSON object",
            json_error_at(&e, 0)
        );
        line_error(line, LineErrorCode::InvalidJson, None, what)
    })?;

    let custom_id = match parsed.custom_id {
        None => {
            return Err(line_error(
                line,
                LineErrorCode::MissingCustomId,
                None,
                "missing \"custom_id\"; every request needs a unique string custom_id to match its result".into(),
            ));
        }
        Some(v) => match serde_json::from_str::<String>(v.get()) {
            Ok(s) if !s.is_empty() && s.len() <= MAX_CUSTOM_ID_BYTES => s,
            Ok(s) if s.is_empty() => {
                return Err(line_error(
                    line,
                    LineErrorCode::InvalidCustomId,
                    None,
                    "\"custom_id\" is empty; give every request a unique non-empty id".into(),
                ));
            }
            Ok(s) => {
                return Err(line_error(
                    line,
                    LineErrorCode::InvalidCustomId,
                    None,
                    format!(
                        "\"custom_id\" is {} bytes, over the limit of {MAX_CUSTOM_ID_BYTES}",
                        s.len()
                    ),
                ));
            }
            Err(_) => {
                return Err(line_error(
                    line,
                    LineErrorCode::InvalidCustomId,
                    None,
                    format!("\"custom_id\" must be a string, got {}", v.get()),
                ));
            }
        },
    };
    let cid = Some(custom_id.clone());
    let err = |code, what: String| line_error(line, code, cid.clone(), what);

    match parsed.method.map(|m| serde_json::from_str::<String>(m.get())) {
        Some(Ok(m)) if m == "POST" => {}
        None => {
            return Err(err(
                LineErrorCode::InvalidMethod,
                "missing \"method\"; it must be \"POST\"".into(),
            ));
        }
        Some(_) => {
            return Err(err(
                LineErrorCode::InvalidMethod,
                format!(
                    "\"method\" is {}; it must be \"POST\"",
                    parsed.method.map(RawValue::get).unwrap_or("")
                ),
            ));
        }
    }
    let allowed = || Endpoint::ALL.map(Endpoint::path).join(" or ");
    let endpoint = match parsed.url.map(|u| serde_json::from_str::<String>(u.get())) {
        Some(Ok(u)) => Endpoint::from_path(&u).ok_or_else(|| {
            err(
                LineErrorCode::InvalidUrl,
                format!("\"url\" is \"{u}\"; it must be {}", allowed()),
            )
        })?,
        None => {
            return Err(err(
                LineErrorCode::InvalidUrl,
                format!("missing \"url\"; it must be {}", allowed()),
            ));
        }
        Some(Err(_)) => {
            return Err(err(
                LineErrorCode::InvalidUrl,
                format!("\"url\" must be a string: {}", allowed()),
            ));
        }
    };
    let body = parsed.body.ok_or_else(|| {
        err(
            LineErrorCode::MissingBody,
            format!("missing \"body\"; it holds the {} request", endpoint.path()),
        )
    })?;
    if !body.get().trim_start().starts_with('{') {
        return Err(err(LineErrorCode::InvalidBody, "\"body\" must be a JSON object".into()));
    }
    let peek: BodyPeek = serde_json::from_str(body.get()).map_err(|e| {
        let offset = body.get().as_ptr() as usize - text.as_ptr() as usize;
        err(
            LineErrorCode::InvalidBody,
            format!("\"body\" is not a valid request ({})", json_error_at(&e, offset)),
        )
    })?;
    match &peek.model {
        None => {}
        Some(serde_json::Value::String(m)) if m == model.as_str() => {}
        Some(other) => {
            let shown = other.as_str().map(str::to_string).unwrap_or_else(|| other.to_string());
            return Err(err(
                LineErrorCode::ModelMismatch,
                format!("body.model is \"{shown}\" but the batch is for \"{model}\"; a batch runs one model"),
            ));
        }
    }
    if peek.stream == Some(true) {
        return Err(err(
            LineErrorCode::InvalidBody,
            "\"stream\": true is not supported in a batch; remove it".into(),
        ));
    }
    match endpoint {
        Endpoint::ChatCompletions if peek.messages.as_ref().is_none_or(Vec::is_empty) => {
            return Err(err(
                LineErrorCode::InvalidBody,
                "a chat completion needs a non-empty \"messages\" array in body".into(),
            ));
        }
        Endpoint::Completions if peek.prompt.is_none() => {
            return Err(err(
                LineErrorCode::InvalidBody,
                "a completion needs \"prompt\" in body".into(),
            ));
        }
        _ => {}
    }
    Ok(ParsedRequest {
        line,
        custom_id,
        endpoint,
        body: body.get().to_string(),
        prompt_tokens_estimate: u32::try_from(body.get().len() / 4).unwrap_or(u32::MAX),
        max_tokens: peek.max_completion_tokens.or(peek.max_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model() -> ModelId {
        ModelId::from("llama-3.1-8b")
    }

    fn chat(id: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"llama-3.1-8b","messages":[{{"role":"user","content":"hi"}}],"max_tokens":16}}}}"#
        )
    }

    fn parse(text: &str) -> Result<ParsedInput, InputError> {
        parse_batch_input(text.as_bytes(), &model(), &InputLimits::default(), false)
    }

    #[test]
    fn requests_sharing_their_leading_messages_share_a_prefix_key() {
        let system = "You summarize support tickets. ".repeat(20);
        let chat = |system: &str, user: &str| {
            format!(
                r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}]}}"#
            )
        };
        let (k1, tokens) = shared_prefix(&chat(&system, "ticket 1")).unwrap();
        let (k2, _) = shared_prefix(&chat(&system, "a different ticket")).unwrap();
        assert_eq!(k1, k2, "the last message is not part of the prefix");
        assert!((150..200).contains(&tokens), "{tokens}");
        let other = shared_prefix(&chat(&system.replace("support", "sales"), "ticket 1")).unwrap();
        assert_ne!(k1, other.0);
        // One message, a short prefix, a completion, or no JSON: no key.
        assert_eq!(shared_prefix(r#"{"messages":[{"role":"user","content":"hi"}]}"#), None);
        assert_eq!(shared_prefix(&chat("be brief", "hi")), None);
        assert_eq!(shared_prefix(r#"{"prompt":"hello"}"#), None);
        assert_eq!(shared_prefix("not json"), None);
    }

    #[test]
    fn valid_lines_parse_with_their_line_numbers() {
        let text = format!("{}\n\n{}\r\n", chat("a"), chat("b"));
        let p = parse(&text).unwrap();
        assert_eq!(p.lines, 2);
        assert_eq!(
            p.requests
                .iter()
                .map(|r| (r.line, r.custom_id.as_str()))
                .collect::<Vec<_>>(),
            [(1, "a"), (3, "b")]
        );
        assert_eq!(p.requests[0].max_tokens, Some(16));
        assert_eq!(p.requests[0].endpoint, Endpoint::ChatCompletions);
        assert!(p.line_errors.is_empty());
    }

    /// Every kind of bad line, with the exact message a tenant reads.
    #[test]
    fn each_bad_line_gets_a_message_saying_what_and_where() {
        let ok = chat("ok");
        let cases: &[(&str, LineErrorCode, &str)] = &[
            (
                "not json",
                LineErrorCode::InvalidJson,
                "line 2: not valid JSON (expected ident at column 2); each line must be one JSON object",
            ),
            (
                "[1,2]",
                LineErrorCode::NotAnObject,
                "line 2: the line is JSON but not an object; each line must be one JSON object with custom_id, method, url and body",
            ),
            (
                r#"{"method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
                LineErrorCode::MissingCustomId,
                "line 2: missing \"custom_id\"; every request needs a unique string custom_id to match its result",
            ),
            (
                r#"{"custom_id":7,"method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
                LineErrorCode::InvalidCustomId,
                "line 2: \"custom_id\" must be a string, got 7",
            ),
            (
                r#"{"custom_id":"","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
                LineErrorCode::InvalidCustomId,
                "line 2: \"custom_id\" is empty; give every request a unique non-empty id",
            ),
            (
                &chat("ok"),
                LineErrorCode::DuplicateCustomId,
                "line 2: custom_id \"ok\" is already used on line 1; every request needs its own custom_id",
            ),
            (
                r#"{"custom_id":"x","method":"GET","url":"/v1/completions","body":{"prompt":"x"}}"#,
                LineErrorCode::InvalidMethod,
                "line 2: \"method\" is \"GET\"; it must be \"POST\"",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"input":"x"}}"#,
                LineErrorCode::InvalidUrl,
                "line 2: \"url\" is \"/v1/embeddings\"; it must be /v1/chat/completions or /v1/completions",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/completions"}"#,
                LineErrorCode::MissingBody,
                "line 2: missing \"body\"; it holds the /v1/completions request",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/completions","body":{"model":"gpt-4o","prompt":"x"}}"#,
                LineErrorCode::ModelMismatch,
                "line 2: body.model is \"gpt-4o\" but the batch is for \"llama-3.1-8b\"; a batch runs one model",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}"#,
                LineErrorCode::InvalidBody,
                "line 2: a chat completion needs a non-empty \"messages\" array in body",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/completions","body":{"prompt":"x","max_tokens":"ten"}}"#,
                LineErrorCode::InvalidBody,
                "line 2: \"body\" is not a valid request (invalid type: string \"ten\", expected u32 at column 96)",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/completions","body":{"prompt":"x","stream":true}}"#,
                LineErrorCode::InvalidBody,
                "line 2: \"stream\": true is not supported in a batch; remove it",
            ),
        ];
        for (line, code, message) in cases {
            let p = parse(&format!("{ok}\n{line}\n")).unwrap();
            assert_eq!(p.requests.len(), 1, "{line}");
            assert_eq!(p.line_errors.len(), 1, "{line}");
            let e = &p.line_errors[0];
            assert_eq!((e.line, e.code), (2, *code), "{line}");
            assert_eq!(e.message, *message);
        }
    }

    #[test]
    fn oversized_lines_and_invalid_utf8_fail_alone() {
        let limits = InputLimits {
            max_line_bytes: 300,
            ..InputLimits::default()
        };
        let big = format!(
            r#"{{"custom_id":"big","method":"POST","url":"/v1/completions","body":{{"prompt":"{}"}}}}"#,
            "x".repeat(400)
        );
        let mut text = format!("{}\n{big}\n", chat("a")).into_bytes();
        text.extend_from_slice(b"{\"custom_id\":\"\xff\"}\n");
        let p = parse_batch_input(&text, &model(), &limits, false).unwrap();
        let codes: Vec<_> = p.line_errors.iter().map(|e| (e.line, e.code)).collect();
        assert_eq!(
            codes,
            [(2, LineErrorCode::LineTooLarge), (3, LineErrorCode::InvalidUtf8)]
        );
        assert!(
            p.line_errors[0]
                .message
                .contains("over the limit of 300 bytes per line"),
            "{}",
            p.line_errors[0]
        );
    }

    #[test]
    fn whole_file_problems_refuse_the_batch() {
        assert_eq!(parse(""), Err(InputError::Empty));
        assert_eq!(parse("\n  \n"), Err(InputError::Empty));
        let e = parse("nope\n{}\n").unwrap_err();
        assert!(matches!(e, InputError::NoValidLines { total: 2, .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("no valid request in the input (2 invalid lines): line 1: not valid JSON"),
            "{e}"
        );

        let limits = InputLimits {
            max_file_bytes: 10,
            ..InputLimits::default()
        };
        let e = parse_batch_input(chat("a").as_bytes(), &model(), &limits, false).unwrap_err();
        assert!(e.to_string().contains("over the limit of 10 bytes"), "{e}");

        let limits = InputLimits {
            max_requests: 1,
            ..InputLimits::default()
        };
        let e = parse_batch_input(
            format!("{}\n{}", chat("a"), chat("b")).as_bytes(),
            &model(),
            &limits,
            false,
        )
        .unwrap_err();
        assert_eq!(
            e,
            InputError::TooManyRequests {
                count: 2,
                limit: 1,
                line: 2
            }
        );
    }

    #[test]
    fn strict_batches_refuse_any_bad_line() {
        let text = format!("{}\nbad\n", chat("a"));
        let e = parse_batch_input(text.as_bytes(), &model(), &InputLimits::default(), true).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("strict batch refused: 1 of its lines are invalid: line 2: not valid JSON"),
            "{e}"
        );
        assert!(parse_batch_input(chat("a").as_bytes(), &model(), &InputLimits::default(), true).is_ok());
    }

    /// A blank line as the parser defines it: ASCII whitespace only (a vertical tab, for
    /// one, is not whitespace to JSON and makes the line invalid).
    fn blank(l: &str) -> bool {
        l.bytes().all(|b| b.is_ascii_whitespace())
    }

    proptest! {
        /// Any bytes at all: no panic, and every non-blank line is either a request or an
        /// error, exactly once, in order.
        #[test]
        fn every_line_is_accounted_for_once(lines in proptest::collection::vec(
            prop_oneof![
                "[a-z]{1,4}".prop_map(|id| chat(&id)),
                any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).replace('\n', " ")),
                Just(String::new()),
            ], 0..40)) {
            let text = lines.join("\n");
            match parse(&text) {
                Ok(p) => {
                    let mut seen: Vec<u32> = p.requests.iter().map(|r| r.line).chain(p.line_errors.iter().map(|e| e.line)).collect();
                    seen.sort_unstable();
                    let expected: Vec<u32> = lines.iter().enumerate().filter(|(_, l)| !blank(l)).map(|(i, _)| i as u32 + 1).collect();
                    prop_assert_eq!(seen, expected);
                    let mut ids: Vec<&str> = p.requests.iter().map(|r| r.custom_id.as_str()).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    prop_assert_eq!(ids.len(), p.requests.len(), "custom_ids are unique among accepted requests");
                }
                Err(InputError::Empty) => prop_assert!(lines.iter().all(|l| blank(l))),
                Err(InputError::NoValidLines { total, .. }) => prop_assert!(total > 0),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
