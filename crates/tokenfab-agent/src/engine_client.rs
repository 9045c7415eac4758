//! The OpenAI-compatible HTTP client the agent uses for every engine: vLLM, SGLang, TGI,
//! llama.cpp `llama-server` and tokenfab's emulator all serve the same API.

use std::time::Duration;
use tokenfab_core::agent::EngineReply;

/// The largest engine answer accepted: far above any real completion, far below what a
/// report can carry.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// A pooled HTTP client for engine calls.
#[derive(Debug, Clone)]
pub struct EngineClient {
    http: reqwest::Client,
}

impl EngineClient {
    pub fn new(timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .expect("a plain HTTP client builds");
        EngineClient { http }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// POSTs one batch request to `base_url` + `path`, with `model` set to the name the
    /// engine serves. Never fails: transport problems become [`EngineReply::Unreachable`].
    pub async fn call(
        &self,
        base_url: &str,
        path: &str,
        body: &[u8],
        engine_model: &str,
        request_id: String,
    ) -> EngineReply {
        let body = match with_model(body, engine_model) {
            Ok(b) => b,
            Err(e) => {
                // Validated at submission; reaching here means the body changed in transit.
                let message = format!("request body is not a JSON object: {e}");
                let error = serde_json::json!({"error": {"message": message, "type": "invalid_request_error"}});
                return EngineReply::Answered {
                    status_code: 400,
                    body: error.to_string().into_bytes(),
                    request_id,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                };
            }
        };
        let sent = self
            .http
            .post(format!("{base_url}{path}"))
            .header("content-type", "application/json")
            .header("x-request-id", request_id.as_str())
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let code = if e.is_timeout() {
                    "engine_timeout"
                } else {
                    "engine_unreachable"
                };
                return EngineReply::Unreachable {
                    code: code.into(),
                    message: error_chain(&e),
                };
            }
        };
        let status_code = resp.status().as_u16();
        let mut resp = resp;
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return EngineReply::Unreachable {
                            code: "engine_response_too_large".into(),
                            message: format!("the engine's answer is over {} MiB", MAX_RESPONSE_BYTES >> 20),
                        };
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return EngineReply::Unreachable {
                        code: "engine_read_failed".into(),
                        message: error_chain(&e),
                    };
                }
            }
        }
        let (prompt_tokens, completion_tokens) = usage(&bytes);
        EngineReply::Answered {
            status_code,
            body: bytes,
            request_id,
            prompt_tokens,
            completion_tokens,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The body with `"model"` set to what the engine serves.
fn with_model(body: &[u8], model: &str) -> Result<Vec<u8>, serde_json::Error> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)?;
    v.insert("model".into(), serde_json::Value::String(model.to_string()));
    serde_json::to_vec(&v)
}

/// `usage.prompt_tokens` and `usage.completion_tokens` of an OpenAI response (0 if absent).
fn usage(body: &[u8]) -> (u64, u64) {
    #[derive(serde::Deserialize, Default)]
    struct U {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    #[derive(serde::Deserialize)]
    struct R {
        #[serde(default)]
        usage: Option<U>,
    }
    serde_json::from_slice::<R>(body)
        .ok()
        .and_then(|r| r.usage)
        .map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_replaced_and_usage_read() {
        let b = with_model(br#"{"model":"llama-3.1-8b","prompt":"x"}"#, "smollm2").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (v["model"].as_str(), v["prompt"].as_str()),
            (Some("smollm2"), Some("x"))
        );
        assert_eq!(
            usage(br#"{"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}"#),
            (3, 9)
        );
        assert_eq!(usage(b"not json"), (0, 0));
    }
}
