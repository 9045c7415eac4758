//! Every kind of bad input a tenant can send gets a gRPC status whose message says what
//! was wrong and where, and changes nothing. A real server on loopback, a real store.

use std::time::Duration;
use tokenfab_control::{ServerConfig, TenantToken};
use tokenfab_core::batch_input::InputLimits;
use tokenfab_core::control::ControlConfig;
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::batch_service_client::BatchServiceClient;
use tokenfab_store::RedbStore;
use tonic::transport::Channel;
use tonic::{Code, Request};

struct Fixture {
    _dir: tempfile::TempDir,
    client: BatchServiceClient<Channel>,
    _server: tokenfab_control::Server,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let config = ServerConfig {
        record: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        openai_listen: None,
        tenants: vec![
            TenantToken::new("acme", "acme-token"),
            TenantToken::new("rival", "rival-token"),
        ],
        agent_secret: "agent-secret-of-this-test".into(),
        admin_token: None,
        http_token: None,
        control: ControlConfig::default(),
        limits: InputLimits {
            max_file_bytes: 64 * 1024,
            max_line_bytes: 2048,
            max_requests: 1000,
            max_json_depth: 16,
        },
        transport: tokenfab_control::Transport::default(),
        tls: None,
    };
    let server = tokenfab_control::start(config, store).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        client: BatchServiceClient::new(channel),
        _server: server,
    }
}

fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn line(id: &str) -> String {
    format!(
        r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"hi"}}],"max_tokens":4}}}}"#
    )
}

fn create(input: String, strict: bool, model: &str) -> pb::CreateBatchRequest {
    pb::CreateBatchRequest {
        options: Some(pb::BatchOptions {
            model: model.into(),
            strict,
            ..Default::default()
        }),
        input_jsonl: input.into_bytes().into(),
    }
}

async fn refused(f: &mut Fixture, req: pb::CreateBatchRequest) -> (Code, String) {
    let e = f.client.create_batch(authed("acme-token", req)).await.unwrap_err();
    (e.code(), e.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batch_input_is_refused_with_what_and_where() {
    let mut f = fixture().await;
    let m = "llama-3.1-8b";

    let (code, msg) = refused(&mut f, create("{not json\n".into(), false, m)).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.starts_with("no valid request in the input (1 invalid lines): line 1: not valid JSON"),
        "{msg}"
    );

    let (code, msg) = refused(&mut f, create(format!("{}\nnope\n", line("a")), true, m)).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.starts_with("strict batch refused: 1 of its lines are invalid: line 2: not valid JSON"),
        "{msg}"
    );

    let missing =
        r#"{"method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}]}}"#;
    let (code, msg) = refused(&mut f, create(format!("{}\n{missing}\n", line("a")), true, m)).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("line 2: missing \"custom_id\""), "{msg}");

    let (code, msg) = refused(&mut f, create(format!("{}\n{}\n", line("a"), line("a")), true, m)).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains("line 2: custom_id \"a\" is already used on line 1"),
        "{msg}"
    );

    let (code, msg) = refused(&mut f, create(line("a"), false, "gpt-9")).await;
    assert_eq!(code, Code::NotFound);
    assert!(
        msg.starts_with("options.model: unknown model 'gpt-9': this cluster serves "),
        "{msg}"
    );

    let big = format!(
        r#"{{"custom_id":"big","method":"POST","url":"/v1/completions","body":{{"prompt":"{}"}}}}"#,
        "x".repeat(3000)
    );
    let (code, msg) = refused(&mut f, create(format!("{}\n{big}\n", line("a")), true, m)).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains("line 2: the request is 3080 bytes, over the limit of 2048 bytes per line"),
        "{msg}"
    );

    let file = (0..600).map(|i| line(&format!("r{i}"))).collect::<Vec<_>>().join("\n");
    let (code, msg) = refused(&mut f, create(file, false, m)).await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(
        msg.contains("over the limit of 65536 bytes; split it into several batches"),
        "{msg}"
    );

    let (code, msg) = refused(&mut f, create(String::new(), false, m)).await;
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::InvalidArgument,
            "the input file is empty: a batch needs at least one JSONL line, one request per line"
        )
    );

    let (code, msg) = refused(
        &mut f,
        pb::CreateBatchRequest {
            options: None,
            input_jsonl: line("a").into_bytes().into(),
        },
    )
    .await;
    assert_eq!(
        (code, msg.as_str()),
        (Code::InvalidArgument, "options is required (at least options.model)")
    );

    let (code, msg) = refused(
        &mut f,
        pb::CreateBatchRequest {
            options: Some(pb::BatchOptions {
                model: m.into(),
                sla_class: "platinum".into(),
                ..Default::default()
            }),
            input_jsonl: line("a").into_bytes().into(),
        },
    )
    .await;
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(
        msg,
        "options.sla_class: unknown SLA class 'platinum': choose one of standard, best-effort"
    );

    // Issue 11: a 100 MiB metadata map was committed and broke the tenant's listing.
    // Metadata is held to OpenAI's limits, checked before anything is read or committed.
    for (metadata, message) in [
        (
            (0..17).map(|i| (format!("k{i}"), "v".to_string())).collect(),
            "options.metadata: more than 16 key-value pairs; keep at most 16 (as in the OpenAI Batch API)",
        ),
        (
            [("note".to_string(), "x".repeat(513))].into_iter().collect(),
            "options.metadata: the value of 'note' is 513 characters, over the limit of 512 (as in the OpenAI Batch API)",
        ),
    ] {
        let (code, msg) = refused(
            &mut f,
            pb::CreateBatchRequest {
                options: Some(pb::BatchOptions {
                    model: m.into(),
                    metadata,
                    ..Default::default()
                }),
                input_jsonl: line("a").into_bytes().into(),
            },
        )
        .await;
        assert_eq!((code, msg.as_str()), (Code::InvalidArgument, message));
    }
    let (code, msg) = refused(
        &mut f,
        pb::CreateBatchRequest {
            options: Some(pb::BatchOptions {
                model: m.into(),
                endpoint: "/v1/embeddings".into(),
                ..Default::default()
            }),
            input_jsonl: line("a").into_bytes().into(),
        },
    )
    .await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.starts_with("options.endpoint: '/v1/embeddings' is not an endpoint"),
        "{msg}"
    );
    // More lines than the configured limit.
    let file = (0..1001)
        .map(|i| format!("{{\"custom_id\":\"{i}\"}}"))
        .collect::<Vec<_>>()
        .join("\n");
    let (code, msg) = refused(&mut f, create(file, false, m)).await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(
        msg.starts_with("the input file has more than 1000 requests (line 1001 is request 1001)"),
        "{msg}"
    );

    // Nothing above created a batch.
    let list = f
        .client
        .list_batches(authed("acme-token", pb::ListBatchesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.batches.is_empty());
}

/// Issue 11's validation gaps: a byte-order mark made line 1 invalid; a batch could mix
/// endpoints; JSON nesting was unlimited (accepted, then refused by the agent with a
/// misleading message); `max_tokens` was not bounded by the model's context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_gaps_are_closed_at_submission() {
    let mut f = fixture().await;
    let completion = r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#;
    let deep = format!(
        r#"{{"custom_id":"d","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":{}"x"{}}}]}}}}"#,
        "[".repeat(20),
        "]".repeat(20)
    );
    let long = r#"{"custom_id":"l","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}],"max_tokens":1000000}}"#;
    let input = format!("\u{feff}{}\n{completion}\n{deep}\n{long}\n", line("a"));
    let resp = f
        .client
        .create_batch(authed("acme-token", create(input, false, "llama-3.1-8b")))
        .await
        .unwrap()
        .into_inner();
    let counts = resp.batch.unwrap().request_counts.unwrap();
    assert_eq!(
        (counts.total, counts.invalid),
        (4, 3),
        "line 1 (after the BOM) is valid"
    );
    let errors: Vec<(u32, &str)> = resp.line_errors.iter().map(|e| (e.line, e.code.as_str())).collect();
    assert_eq!(
        errors,
        [
            (2, "endpoint_mismatch"),
            (3, "json_too_deep"),
            (4, "max_tokens_too_large")
        ]
    );
    assert!(
        resp.line_errors[2]
            .message
            .contains("llama-3.1-8b's context of 131072 tokens"),
        "{}",
        resp.line_errors[2].message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_lines_fail_alone_when_not_strict() {
    let mut f = fixture().await;
    let input = format!("{}\n{{oops\n{}\n", line("a"), line("b"));
    let resp = f
        .client
        .create_batch(authed("acme-token", create(input, false, "llama-3.1-8b")))
        .await
        .unwrap()
        .into_inner();
    let batch = resp.batch.unwrap();
    assert_eq!(batch.status, pb::BatchStatus::Queued as i32);
    let counts = batch.request_counts.unwrap();
    assert_eq!((counts.total, counts.invalid), (3, 1));
    assert_eq!(resp.line_errors.len(), 1);
    assert_eq!(
        (resp.line_errors[0].line, resp.line_errors[0].code.as_str()),
        (2, "invalid_json")
    );
    // The invalid line is already in the error output.
    let mut s = f
        .client
        .stream_results(authed(
            "acme-token",
            pb::StreamResultsRequest {
                batch_id: batch.id.clone(),
                kind: pb::ResultKind::Errors as i32,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.line, 2);
    assert!(matches!(first.outcome, Some(pb::result_record::Outcome::Error(ref e)) if e.code == "invalid_json"));
    assert!(s.message().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_see_or_touch_each_others_batches() {
    let mut f = fixture().await;
    let resp = f
        .client
        .create_batch(authed("acme-token", create(line("a"), false, "llama-3.1-8b")))
        .await
        .unwrap()
        .into_inner();
    let id = resp.batch.unwrap().id;

    let e = f
        .client
        .get_batch(authed("rival-token", pb::GetBatchRequest { batch_id: id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, format!("batch {id} not found for this tenant").as_str())
    );
    let e = f
        .client
        .cancel_batch(authed("rival-token", pb::CancelBatchRequest { batch_id: id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = f
        .client
        .stream_results(authed(
            "rival-token",
            pb::StreamResultsRequest {
                batch_id: id.clone(),
                kind: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = f
        .client
        .watch_batch(authed(
            "rival-token",
            pb::WatchBatchRequest {
                batch_id: id.clone(),
                min_interval_ms: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let list = f
        .client
        .list_batches(authed("rival-token", pb::ListBatchesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.batches.is_empty());
    // Still queued, untouched.
    let b = f
        .client
        .get_batch(authed("acme-token", pb::GetBatchRequest { batch_id: id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.status, pb::BatchStatus::Queued as i32);

    let e = f
        .client
        .get_batch(authed(
            "acme-token",
            pb::GetBatchRequest {
                batch_id: "batch_00009999".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "batch batch_00009999 not found for this tenant")
    );
    let e = f
        .client
        .get_batch(authed("acme-token", pb::GetBatchRequest { batch_id: "42".into() }))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "batch_id: '42' is not a batch id: batch ids look like batch_00000042"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_tokens_are_unauthenticated() {
    let mut f = fixture().await;
    let e = f
        .client
        .list_batches(Request::new(pb::ListBatchesRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        e.message(),
        "missing bearer token: send metadata `authorization: Bearer <tenant token>`"
    );
    let e = f
        .client
        .list_batches(authed("guess", pb::ListBatchesRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("not valid for any tenant"));
    // The agent secret does not open the tenant API.
    let e = f
        .client
        .list_batches(authed("agent-secret-of-this-test", pb::ListBatchesRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_twice_says_why_not() {
    let mut f = fixture().await;
    let resp = f
        .client
        .create_batch(authed("acme-token", create(line("a"), false, "llama-3.1-8b")))
        .await
        .unwrap()
        .into_inner();
    let id = resp.batch.unwrap().id;
    let b = f
        .client
        .cancel_batch(authed("acme-token", pb::CancelBatchRequest { batch_id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        b.status,
        pb::BatchStatus::Cancelled as i32,
        "nothing was running: cancelled at once"
    );
    let e = f
        .client
        .cancel_batch(authed("acme-token", pb::CancelBatchRequest { batch_id: id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::FailedPrecondition,
            format!("{id} is cancelled; it cannot become cancelling").as_str()
        )
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
