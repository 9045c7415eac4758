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
    /// Deepest nesting of JSON arrays and objects in a request body. Engines parse bodies
    /// with recursion limits of their own (serde_json's is 128); a body that nests deeper
    /// than they accept is refused here, at submission, not later by the agent.
    pub max_json_depth: u32,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_file_bytes: 200 * 1024 * 1024,
            max_line_bytes: 1024 * 1024,
            max_requests: 100_000,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
        }
    }
}

/// The default [`InputLimits::max_json_depth`]: chat requests nest 4 to 6 levels (body,
/// messages, message, content parts, tool schemas a few more).
pub const DEFAULT_MAX_JSON_DEPTH: u32 = 32;

/// The OpenAI endpoints a batch request may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub enum Endpoint {
    #[default]
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

/// One valid request of a batch. Its body is not copied: it stays in the input file, at
/// `body_offset` (bytes from the start of the file) for `body_len` bytes, JSON text
/// exactly as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParsedRequest {
    /// 1-based line in the input file.
    pub line: u32,
    pub custom_id: String,
    pub body_offset: u64,
    pub body_len: u32,
    /// Rough prompt size for scheduling (body bytes / 4). Never billed: billing uses the
    /// engine's own `usage` counts.
    pub prompt_tokens_estimate: u32,
    /// `max_tokens` or `max_completion_tokens`, if the body sets one.
    pub max_tokens: Option<u32>,
}

impl ParsedRequest {
    /// The body inside `input`, the file it was parsed from.
    pub fn body<'a>(&self, input: &'a [u8]) -> &'a [u8] {
        let start = usize::try_from(self.body_offset).unwrap_or(usize::MAX);
        input
            .get(start..start.saturating_add(self.body_len as usize))
            .unwrap_or_default()
    }
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
    /// The line targets another endpoint than the batch.
    EndpointMismatch,
    /// The body nests JSON deeper than [`InputLimits::max_json_depth`].
    JsonTooDeep,
    /// `max_tokens` is more than the model's context holds.
    MaxTokensTooLarge,
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
            LineErrorCode::EndpointMismatch => "endpoint_mismatch",
            LineErrorCode::JsonTooDeep => "json_too_deep",
            LineErrorCode::MaxTokensTooLarge => "max_tokens_too_large",
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
    /// The endpoint every request targets.
    pub endpoint: Endpoint,
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

/// Parses and validates a whole input file for a batch on `model` (see [`InputParser`]
/// for files read piece by piece).
pub fn parse_batch_input(
    input: &[u8],
    model: &ModelId,
    limits: &InputLimits,
    strict: bool,
) -> Result<ParsedInput, InputError> {
    let mut parser = InputParser::new(model.clone(), *limits, strict);
    parser.feed(input)?;
    parser.finish()
}

/// The UTF-8 byte-order mark some editors write at the start of a file; tolerated there.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parses and validates an input file fed in pieces of any size, holding at most one line
/// (up to [`InputLimits::max_line_bytes`]) in memory: a file of any size is checked in
/// bounded memory, and request bodies are located in the file, not copied.
#[derive(Debug)]
pub struct InputParser {
    model: ModelId,
    limits: InputLimits,
    strict: bool,
    /// The endpoint the batch targets: given, or taken from its first valid request.
    endpoint: Option<(Endpoint, u32)>,
    max_context: Option<u32>,
    first_line_of: BTreeMap<String, u32>,
    out: ParsedInput,
    /// The line being assembled, its start in the file and number.
    partial: Vec<u8>,
    partial_at: u64,
    line_no: u32,
    /// Set once the line being assembled is longer than the limit: its length so far,
    /// and whether it is blank so far (its bytes are not kept).
    oversized: Option<(u64, bool)>,
}

impl InputParser {
    pub fn new(model: ModelId, limits: InputLimits, strict: bool) -> Self {
        InputParser {
            model,
            limits,
            strict,
            endpoint: None,
            max_context: None,
            first_line_of: BTreeMap::new(),
            out: ParsedInput::default(),
            partial: Vec::new(),
            partial_at: 0,
            line_no: 0,
            oversized: None,
        }
    }

    /// Every request must target `endpoint` (by default, the one of the first valid
    /// request).
    pub fn endpoint(mut self, endpoint: Option<Endpoint>) -> Self {
        self.endpoint = endpoint.map(|e| (e, 0));
        self
    }

    /// Refuse requests whose `max_tokens` is more than the model's context holds.
    pub fn max_context(mut self, tokens: Option<u32>) -> Self {
        self.max_context = tokens;
        self
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.out.bytes
    }

    /// Feeds the next piece of the file. Fails as soon as the file is over a limit that
    /// refuses the whole batch.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), InputError> {
        let start = self.out.bytes;
        self.out.bytes += chunk.len() as u64;
        if self.out.bytes > self.limits.max_file_bytes {
            return Err(InputError::TooLarge {
                bytes: self.out.bytes,
                limit: self.limits.max_file_bytes,
            });
        }
        let mut rest = chunk;
        let mut at = start;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.append(&rest[..i]);
                    self.end_line()?;
                    at += i as u64 + 1;
                    self.partial_at = at;
                    rest = &rest[i + 1..];
                }
                None => {
                    self.append(rest);
                    rest = &[];
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, piece: &[u8]) {
        if let Some((len, blank)) = &mut self.oversized {
            *len += piece.len() as u64;
            *blank &= piece.iter().all(u8::is_ascii_whitespace);
            return;
        }
        // One byte over the limit may be the `\r` of a CRLF line end: keep it.
        if self.partial.len() + piece.len() > self.limits.max_line_bytes.saturating_add(1) {
            let len = (self.partial.len() + piece.len()) as u64;
            let blank = self.partial.iter().chain(piece).all(u8::is_ascii_whitespace);
            self.oversized = Some((len, blank));
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(piece);
        }
    }

    fn end_line(&mut self) -> Result<(), InputError> {
        self.line_no = self.line_no.saturating_add(1);
        let line_no = self.line_no;
        let mut raw = std::mem::take(&mut self.partial);
        let mut offset = self.partial_at;
        if offset == 0 && raw.starts_with(BOM) {
            raw.drain(..BOM.len());
            offset = BOM.len() as u64;
        }
        let oversized = self.oversized.take();
        let blank = match oversized {
            Some((_, blank)) => blank,
            None => raw
                .strip_suffix(b"\r")
                .unwrap_or(&raw)
                .iter()
                .all(u8::is_ascii_whitespace),
        };
        if blank {
            self.partial = raw;
            self.partial.clear();
            return Ok(());
        }
        self.out.lines += 1;
        if self.out.lines as usize > self.limits.max_requests {
            return Err(InputError::TooManyRequests {
                count: self.out.lines as usize,
                limit: self.limits.max_requests,
                line: line_no,
            });
        }
        let result = match oversized {
            Some((len, _)) => Err(too_large(line_no, len, self.limits.max_line_bytes)),
            None => {
                let text = raw.strip_suffix(b"\r").unwrap_or(&raw);
                let rules = LineRules {
                    model: &self.model,
                    limits: &self.limits,
                    endpoint: self.endpoint,
                    max_context: self.max_context,
                };
                parse_line(text, line_no, offset, &rules)
            }
        };
        // Keep the buffer's allocation for the next line.
        self.partial = raw;
        self.partial.clear();
        match result {
            // A duplicate is refused on its second (and later) appearance.
            Ok((req, _)) if self.first_line_of.contains_key(&req.custom_id) => {
                let first = self.first_line_of[&req.custom_id];
                let what = format!(
                    "custom_id \"{}\" is already used on line {first}; every request needs its own custom_id",
                    req.custom_id
                );
                self.out.line_errors.push(line_error(
                    line_no,
                    LineErrorCode::DuplicateCustomId,
                    Some(req.custom_id),
                    what,
                ));
            }
            Ok((req, endpoint)) => {
                if self.endpoint.is_none() {
                    self.endpoint = Some((endpoint, line_no));
                }
                self.first_line_of.insert(req.custom_id.clone(), line_no);
                self.out.requests.push(req);
            }
            Err(e) => self.out.line_errors.push(e),
        }
        Ok(())
    }

    /// Ends the file: the last line needs no line break.
    pub fn finish(mut self) -> Result<ParsedInput, InputError> {
        if !self.partial.is_empty() || self.oversized.is_some() {
            self.end_line()?;
        }
        let mut out = self.out;
        out.endpoint = self.endpoint.map_or_else(Endpoint::default, |(e, _)| e);
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
        if self.strict && total > 0 {
            return Err(InputError::StrictRefused {
                errors: out.line_errors,
                total,
            });
        }
        Ok(out)
    }
}

fn too_large(line: u32, len: u64, limit: usize) -> LineError {
    line_error(
        line,
        LineErrorCode::LineTooLarge,
        None,
        format!("the request is {len} bytes, over the limit of {limit} bytes per line; shorten the prompt"),
    )
}

/// How deeply `json` nests arrays and objects (0 for a scalar), counted without
/// recursion so that no input can exhaust the stack.
pub fn json_depth(json: &[u8]) -> u32 {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0u32, 0u32, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// What a line is checked against.
struct LineRules<'a> {
    model: &'a ModelId,
    limits: &'a InputLimits,
    /// The batch's endpoint and the line that set it (0: given with the batch).
    endpoint: Option<(Endpoint, u32)>,
    max_context: Option<u32>,
}

/// A serde_json error located by its column in the line (`offset` = where the parsed
/// text starts in the line), instead of serde's position inside the fragment.
fn json_error_at(e: &serde_json::Error, offset: usize) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let bare = full.strip_suffix(&suffix).unwrap_or(&full);
    format!("{bare} at column {}", offset + e.column())
}

/// A value from the input as an error message shows it: at most [`QUOTED_CHARS`]
/// characters, so that messages (kept with the batch's results) stay small whatever the
/// input holds.
fn quoted(text: &str) -> String {
    if text.chars().count() <= QUOTED_CHARS {
        return text.to_string();
    }
    let head: String = text.chars().take(QUOTED_CHARS).collect();
    format!("{head}... ({} bytes)", text.len())
}

/// The most characters of an input value an error message repeats.
pub const QUOTED_CHARS: usize = 80;

impl LineError {
    /// What it takes in the store, bytes.
    pub fn stored_bytes(&self) -> u64 {
        (self.message.len() + self.custom_id.as_ref().map_or(0, String::len) + 32) as u64
    }
}

fn line_error(line: u32, code: LineErrorCode, custom_id: Option<String>, what: String) -> LineError {
    LineError {
        line,
        code,
        custom_id,
        message: format!("line {line}: {what}"),
    }
}

/// Checks one line (without its line break) that starts `offset` bytes into the file.
fn parse_line(
    raw: &[u8],
    line: u32,
    offset: u64,
    rules: &LineRules<'_>,
) -> Result<(ParsedRequest, Endpoint), LineError> {
    let (model, limits) = (rules.model, rules.limits);
    if raw.len() > limits.max_line_bytes {
        return Err(too_large(line, raw.len() as u64, limits.max_line_bytes));
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
                    format!("\"custom_id\" must be a string, got {}", quoted(v.get())),
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
                    quoted(parsed.method.map(RawValue::get).unwrap_or(""))
                ),
            ));
        }
    }
    let allowed = || Endpoint::ALL.map(Endpoint::path).join(" or ");
    let endpoint = match parsed.url.map(|u| serde_json::from_str::<String>(u.get())) {
        Some(Ok(u)) => Endpoint::from_path(&u).ok_or_else(|| {
            err(
                LineErrorCode::InvalidUrl,
                format!("\"url\" is \"{}\"; it must be {}", quoted(&u), allowed()),
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
    if let Some((batch, set_by)) = rules.endpoint
        && batch != endpoint
    {
        let why = if set_by == 0 {
            "the batch was created for".to_string()
        } else {
            format!("the batch's first request (line {set_by}) targets")
        };
        return Err(err(
            LineErrorCode::EndpointMismatch,
            format!(
                "\"url\" is \"{}\" but {why} {}; a batch targets one endpoint, so submit these requests as another batch",
                endpoint.path(),
                batch.path()
            ),
        ));
    }
    let body = parsed.body.ok_or_else(|| {
        err(
            LineErrorCode::MissingBody,
            format!("missing \"body\"; it holds the {} request", endpoint.path()),
        )
    })?;
    if !body.get().trim_start().starts_with('{') {
        return Err(err(LineErrorCode::InvalidBody, "\"body\" must be a JSON object".into()));
    }
    let depth = json_depth(body.get().as_bytes());
    if depth > limits.max_json_depth {
        return Err(err(
            LineErrorCode::JsonTooDeep,
            format!(
                "\"body\" nests JSON arrays and objects {depth} levels deep, over the limit of {}; flatten the request",
                limits.max_json_depth
            ),
        ));
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
                format!(
                    "body.model is \"{}\" but the batch is for \"{model}\"; a batch runs one model",
                    quoted(&shown)
                ),
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
    let max_tokens = peek.max_completion_tokens.or(peek.max_tokens);
    if let (Some(asked), Some(context)) = (max_tokens, rules.max_context)
        && asked > context
    {
        return Err(err(
            LineErrorCode::MaxTokensTooLarge,
            format!(
                "max_tokens is {asked}, more than {model}'s context of {context} tokens holds; ask for at most {context}"
            ),
        ));
    }
    let body_start = body.get().as_ptr() as usize - text.as_ptr() as usize;
    let body_len = u32::try_from(body.get().len()).unwrap_or(u32::MAX);
    Ok((
        ParsedRequest {
            line,
            custom_id,
            body_offset: offset + body_start as u64,
            body_len,
            prompt_tokens_estimate: body_len / 4,
            max_tokens,
        },
        endpoint,
    ))
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
        assert_eq!(p.endpoint, Endpoint::ChatCompletions);
        let body = std::str::from_utf8(p.requests[1].body(text.as_bytes())).unwrap();
        assert!(
            body.starts_with("{\"model\"") && body.ends_with("\"max_tokens\":16}"),
            "{body}"
        );
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
        let ok_completion = r#"{"custom_id":"ok","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#;
        for (line, code, message) in cases {
            // The first line sets the batch's endpoint: the same as the case's.
            let ok = if line.contains("\"/v1/completions\"") {
                ok_completion
            } else {
                ok.as_str()
            };
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
    fn a_byte_order_mark_is_tolerated_at_the_start_of_the_file() {
        let text = format!("\u{feff}{}\n{}\n", chat("a"), chat("b"));
        let p = parse(&text).unwrap();
        assert_eq!(p.requests.len(), 2, "{:?}", p.line_errors);
        let body = std::str::from_utf8(p.requests[0].body(text.as_bytes())).unwrap();
        assert!(body.starts_with('{') && body.ends_with('}'), "{body}");
        // Elsewhere it is not whitespace: the line is invalid JSON.
        let p = parse(&format!("{}\n\u{feff}{}\n", chat("a"), chat("b"))).unwrap();
        assert_eq!(p.line_errors[0].code, LineErrorCode::InvalidJson);
    }

    #[test]
    fn messages_quote_at_most_a_little_of_the_input() {
        let url = format!("/v1/{}", "x".repeat(100_000));
        let text = format!(
            "{}\n{{\"custom_id\":\"u\",\"method\":\"POST\",\"url\":\"{url}\",\"body\":{{}}}}\n",
            chat("a")
        );
        let p = parse(&text).unwrap();
        let m = &p.line_errors[0].message;
        assert!(m.len() < 400, "{} bytes", m.len());
        assert!(m.contains("... (100004 bytes)"), "{m}");
        assert!(p.line_errors[0].stored_bytes() < 500);
    }

    #[test]
    fn a_batch_targets_one_endpoint() {
        let completion = r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#;
        let p = parse(&format!("{}\n{completion}\n", chat("a"))).unwrap();
        assert_eq!(p.endpoint, Endpoint::ChatCompletions);
        assert_eq!(p.requests.len(), 1);
        assert_eq!(
            p.line_errors[0].message,
            "line 2: \"url\" is \"/v1/completions\" but the batch's first request (line 1) targets /v1/chat/completions; a batch targets one endpoint, so submit these requests as another batch"
        );
        // An endpoint given with the batch rules from the first line on.
        let mut parser = InputParser::new(model(), InputLimits::default(), false).endpoint(Some(Endpoint::Completions));
        parser
            .feed(format!("{}\n{completion}\n", chat("a")).as_bytes())
            .unwrap();
        let p = parser.finish().unwrap();
        assert_eq!(p.endpoint, Endpoint::Completions);
        assert_eq!(p.requests.len(), 1);
        assert!(
            p.line_errors[0]
                .message
                .contains("but the batch was created for /v1/completions"),
            "{}",
            p.line_errors[0]
        );
    }

    #[test]
    fn deep_json_and_impossible_max_tokens_are_refused_at_submission() {
        let deep = format!(
            r#"{{"custom_id":"d","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":{}1{}}}]}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        let long = r#"{"custom_id":"l","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}],"max_tokens":200000}}"#;
        let mut parser = InputParser::new(model(), InputLimits::default(), false).max_context(Some(131_072));
        parser
            .feed(format!("{}\n{deep}\n{long}\n", chat("a")).as_bytes())
            .unwrap();
        let p = parser.finish().unwrap();
        let found: Vec<_> = p.line_errors.iter().map(|e| (e.line, e.code)).collect();
        assert_eq!(
            found,
            [(2, LineErrorCode::JsonTooDeep), (3, LineErrorCode::MaxTokensTooLarge)]
        );
        assert_eq!(
            p.line_errors[0].message,
            "line 2: \"body\" nests JSON arrays and objects 43 levels deep, over the limit of 32; flatten the request"
        );
        assert_eq!(
            p.line_errors[1].message,
            "line 3: max_tokens is 200000, more than llama-3.1-8b's context of 131072 tokens holds; ask for at most 131072"
        );
        assert_eq!(json_depth(br#"{"a":"[[[[{{{","b":[1,{"c":"\"]"}]}"#), 3);
    }

    #[test]
    fn an_oversized_line_is_not_held_in_memory() {
        let limits = InputLimits {
            max_line_bytes: 300,
            ..InputLimits::default()
        };
        let mut parser = InputParser::new(model(), limits, false);
        parser.feed(chat("a").as_bytes()).unwrap();
        parser.feed(b"\n{\"custom_id\":\"big\",").unwrap();
        for _ in 0..1000 {
            parser.feed(&[b'x'; 1000]).unwrap();
            assert!(parser.partial.capacity() <= 1024, "the oversized line is not buffered");
        }
        parser.feed(b"\n").unwrap();
        parser.feed(chat("b").as_bytes()).unwrap();
        let p = parser.finish().unwrap();
        assert_eq!(p.requests.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            p.line_errors.iter().map(|e| (e.line, e.code)).collect::<Vec<_>>(),
            [(2, LineErrorCode::LineTooLarge)]
        );
        assert!(
            p.line_errors[0]
                .message
                .contains("line 2: the request is 1000019 bytes, over the limit of 300"),
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

        /// Feeding a file in pieces of any sizes parses it exactly as feeding it whole.
        #[test]
        fn pieces_of_any_size_parse_as_the_whole(lines in proptest::collection::vec(
            prop_oneof![
                "[a-z]{1,4}".prop_map(|id| chat(&id)),
                "[ -~]{0,30}",
                Just("\r".to_string()),
            ], 0..20), cuts in proptest::collection::vec(0usize..400, 0..10)) {
            let text = lines.join("\n");
            let mut cuts = cuts;
            cuts.push(text.len());
            cuts.sort_unstable();
            let mut parser = InputParser::new(model(), InputLimits { max_line_bytes: 120, ..InputLimits::default() }, false);
            let whole_small = parse_batch_input(text.as_bytes(), &model(), &InputLimits { max_line_bytes: 120, ..InputLimits::default() }, false);
            let mut at = 0;
            for c in cuts {
                let c = c.min(text.len());
                if c > at {
                    parser.feed(&text.as_bytes()[at..c]).unwrap();
                    at = c;
                }
            }
            prop_assert_eq!(parser.finish(), whole_small);
        }
    }
}
