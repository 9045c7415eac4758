//! The flight recorder.
//!
//! A control plane started with `--record DIR` writes what its core receives: one
//! *segment* per core it runs (a process start, or a rebuild after a failed commit), as one
//! JSON Lines file `control-<unix ms>-<pid>-<n>.jsonl`:
//!
//! - a `start` line: the configuration and the durable state the core started from
//!   ([`ControlStart`]) and the time;
//! - an `input` line for each [`ControlInput`] with its time and a digest of the core's
//!   reply;
//! - an `actions` line each time the shell takes the core's actions, with their count and
//!   digest.
//!
//! [`replay`] feeds each segment through a fresh core, in order, and checks every digest:
//! the first difference is reported with where it is and what the two sides said. A
//! segment cut short (the process was killed mid-write) replays up to its last complete
//! line.
//!
//! Size is bounded: when the files in `DIR` would pass `max_bytes`, the oldest segments
//! are deleted whole (a segment can only be replayed from its start); a segment that alone
//! reaches the bound stops being written, and its prefix still replays.

use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use tokenfab_core::Timestamp;
use tokenfab_core::agent::{AgentAction, AgentConfig, AgentCore, ReplicaSpec};
use tokenfab_core::control::{Action, ControlConfig, ControlCore};
use tokenfab_core::protocol::{AgentInput, ControlInput, ControlReply, ControlStart};

/// The format's version, in every `start` line.
pub const VERSION: u32 = 1;

/// How much of an output's text a recording keeps to show in a divergence report.
const HEAD_CHARS: usize = 240;

/// One line of a recording, as read back.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Start {
        version: u32,
        at: Timestamp,
        config: Box<ControlConfig>,
        state: Box<ControlStart>,
    },
    Input {
        at: Timestamp,
        input: Box<ControlInput>,
        reply: String,
        head: String,
    },
    Actions {
        n: usize,
        digest: String,
        head: String,
    },
    /// An agent core's start: its configuration and replicas.
    StartAgent {
        version: u32,
        at: Timestamp,
        node: String,
        config: Box<AgentConfig>,
        replicas: Vec<ReplicaSpec>,
    },
    /// An input of an agent core (it answers through its actions).
    AgentInput {
        at: Timestamp,
        input: Box<AgentInput>,
    },
}

/// One line of a recording, as written (the input already serialized).
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum LineOut<'a> {
    Start {
        version: u32,
        at: Timestamp,
        config: &'a ControlConfig,
        state: &'a ControlStart,
    },
    Input {
        at: Timestamp,
        input: &'a serde_json::value::RawValue,
        reply: String,
        head: String,
    },
    Actions {
        n: usize,
        digest: String,
        head: String,
    },
    StartAgent {
        version: u32,
        at: Timestamp,
        node: &'a str,
        config: &'a AgentConfig,
        replicas: &'a [ReplicaSpec],
    },
    AgentInput {
        at: Timestamp,
        input: &'a AgentInput,
    },
}

/// A digest of an output: its `Debug` text (the core's types print deterministically:
/// ordered maps only), hashed, and the text's beginning.
fn digest_of(text: &str) -> (String, String) {
    let hash = sha2::Sha256::digest(text.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    (hex, text.chars().take(HEAD_CHARS).collect())
}

fn reply_digest(reply: &ControlReply) -> (String, String) {
    digest_of(&format!("{reply:?}"))
}

fn actions_digest(actions: &[Action]) -> (String, String) {
    digest_of(&format!("{actions:?}"))
}

fn agent_actions_digest(actions: &[AgentAction]) -> (String, String) {
    digest_of(&format!("{actions:?}"))
}

/// Writes what a control core receives into a folder.
pub struct Recorder {
    dir: PathBuf,
    /// What its files are called: `control`, or `agent-<node>`.
    prefix: String,
    max_bytes: u64,
    /// Finished segments in the folder, oldest first, with their sizes.
    old: std::collections::VecDeque<(PathBuf, u64)>,
    current: Option<Segment>,
    segments: u32,
}

struct Segment {
    path: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
    /// Stopped: the size bound was reached or a write failed.
    stopped: bool,
}

/// What went wrong opening a recording folder.
#[derive(Debug, thiserror::Error)]
#[error("cannot record into {dir}: {source}; check that the folder can be created and written (--record)")]
pub struct OpenError {
    dir: String,
    source: std::io::Error,
}

/// The segment files in `dir` whose names start with `prefix` (any recording: `None`),
/// oldest first within each prefix.
/// Whether `rest` is what follows a recorder's prefix in a segment's name
/// (`{unix_ms:013}-{:07}-{:03}.jsonl`), so that node `n1`'s files are not taken for node
/// `n1-5`'s or the other way round.
fn is_segment_suffix(rest: &str) -> bool {
    let Some(stem) = rest.strip_suffix(".jsonl") else {
        return false;
    };
    let parts: Vec<&str> = stem.split('-').collect();
    // The time has 13 digits; the process id and the segment number at least one each.
    parts.len() == 3
        && parts[0].len() == 13
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn segment_files(dir: &Path, prefix: Option<&str>) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.ends_with(".jsonl")
                    && match prefix {
                        Some(prefix) => n
                            .strip_prefix(prefix)
                            .and_then(|rest| rest.strip_prefix('-'))
                            .is_some_and(is_segment_suffix),
                        None => n.starts_with("control-") || n.starts_with("agent-"),
                    }
            })
        })
        .collect();
    files.sort();
    Ok(files)
}

impl Recorder {
    /// Records a control core into `dir` (created if missing), keeping at most `max_bytes`
    /// of control-core recordings there.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Recorder, OpenError> {
        Recorder::open_as(dir, max_bytes, "control")
    }

    /// Records the agent core of node `node` into `dir`, keeping at most `max_bytes` of
    /// that node's recordings there.
    pub fn open_agent(dir: &Path, max_bytes: u64, node: &str) -> Result<Recorder, OpenError> {
        Recorder::open_as(dir, max_bytes, &format!("agent-{node}"))
    }

    fn open_as(dir: &Path, max_bytes: u64, prefix: &str) -> Result<Recorder, OpenError> {
        let err = |source| OpenError {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let old = segment_files(dir, Some(prefix))
            .map_err(err)?
            .into_iter()
            .map(|p| {
                let len = std::fs::metadata(&p).map_or(0, |m| m.len());
                (p, len)
            })
            .collect();
        Ok(Recorder {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            max_bytes,
            old,
            current: None,
            segments: 0,
        })
    }

    /// Begins a new segment: a control core started at `at` with `config` from `state`.
    pub fn start(&mut self, at: Timestamp, config: &ControlConfig, state: &ControlStart) {
        if self.new_segment(at) {
            self.write(&LineOut::Start {
                version: VERSION,
                at,
                config,
                state,
            });
        }
    }

    /// Begins a new segment: the agent core of `node` started at `at`.
    pub fn start_agent(&mut self, at: Timestamp, node: &str, config: &AgentConfig, replicas: &[ReplicaSpec]) {
        if self.new_segment(at) {
            self.write(&LineOut::StartAgent {
                version: VERSION,
                at,
                node,
                config,
                replicas,
            });
        }
    }

    /// Records an input of an agent core (before the core takes it).
    pub fn agent_input(&mut self, at: Timestamp, input: &AgentInput) {
        if self.recording() {
            self.write(&LineOut::AgentInput { at, input });
        }
    }

    /// Records the actions the shell took from an agent core.
    pub fn agent_actions(&mut self, actions: &[AgentAction]) {
        if !self.recording() {
            return;
        }
        let (digest, head) = agent_actions_digest(actions);
        self.write(&LineOut::Actions {
            n: actions.len(),
            digest,
            head,
        });
    }

    /// Closes the segment being written and opens the next; false if it cannot.
    fn new_segment(&mut self, at: Timestamp) -> bool {
        if let Some(mut s) = self.current.take() {
            let _ = s.out.flush();
            self.old.push_back((s.path, s.bytes));
        }
        let unix_ms = at.as_micros() / 1000;
        let path = loop {
            let name = format!(
                "{}-{unix_ms:013}-{:07}-{:03}.jsonl",
                self.prefix,
                std::process::id(),
                self.segments
            );
            self.segments += 1;
            let path = self.dir.join(name);
            if !path.exists() {
                break path;
            }
        };
        match File::create(&path) {
            Ok(f) => {
                self.current = Some(Segment {
                    path,
                    out: BufWriter::new(f),
                    bytes: 0,
                    stopped: false,
                });
                true
            }
            Err(e) => {
                tracing::warn!("flight recorder: cannot create {}: {e}; not recording", path.display());
                false
            }
        }
    }

    /// Serializes an input before the core takes it (`None` when nothing is recorded).
    pub fn prepare(&self, input: &ControlInput) -> Option<Box<serde_json::value::RawValue>> {
        if !self.recording() {
            return None;
        }
        serde_json::to_string(input)
            .ok()
            .and_then(|s| serde_json::value::RawValue::from_string(s).ok())
    }

    /// Records an input (from [`Recorder::prepare`]) and the core's reply to it.
    pub fn input(&mut self, at: Timestamp, input: Option<Box<serde_json::value::RawValue>>, reply: &ControlReply) {
        let Some(input) = input else { return };
        let (reply, head) = reply_digest(reply);
        self.write(&LineOut::Input {
            at,
            input: &input,
            reply,
            head,
        });
    }

    /// Records the actions the shell took from the core.
    pub fn actions(&mut self, actions: &[Action]) {
        if !self.recording() {
            return;
        }
        let (digest, head) = actions_digest(actions);
        self.write(&LineOut::Actions {
            n: actions.len(),
            digest,
            head,
        });
    }

    /// Writes buffered lines out (after each round, so that a killed process loses at
    /// most the round it was in).
    pub fn flush(&mut self) {
        if let Some(s) = self.current.as_mut()
            && !s.stopped
            && let Err(e) = s.out.flush()
        {
            tracing::warn!(
                "flight recorder: cannot write {}: {e}; recording stopped",
                s.path.display()
            );
            s.stopped = true;
        }
    }

    fn recording(&self) -> bool {
        self.current.as_ref().is_some_and(|s| !s.stopped)
    }

    fn write(&mut self, line: &LineOut<'_>) {
        let Ok(mut text) = serde_json::to_string(line) else {
            return;
        };
        text.push('\n');
        let len = text.len() as u64;
        // Make room by deleting the oldest segments whole.
        let mut total: u64 =
            self.old.iter().map(|(_, n)| n).sum::<u64>() + self.current.as_ref().map_or(0, |s| s.bytes);
        while total + len > self.max_bytes
            && let Some((path, n)) = self.old.pop_front()
        {
            let _ = std::fs::remove_file(&path);
            total -= n;
        }
        let Some(s) = self.current.as_mut() else { return };
        if s.stopped {
            return;
        }
        if total + len > self.max_bytes {
            tracing::warn!(
                "flight recorder: {} reached the size bound ({} bytes); the rest of this run is not recorded (raise --record-max-bytes)",
                s.path.display(),
                self.max_bytes
            );
            s.stopped = true;
            let _ = s.out.flush();
            return;
        }
        if let Err(e) = s.out.write_all(text.as_bytes()) {
            tracing::warn!(
                "flight recorder: cannot write {}: {e}; recording stopped",
                s.path.display()
            );
            s.stopped = true;
            return;
        }
        s.bytes += len;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Where a replay first differs from its recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    pub file: PathBuf,
    /// 1-based line of the recording.
    pub line: usize,
    /// What the line records: the input's kind, or "actions".
    pub what: String,
    pub at: Option<Timestamp>,
    /// The recorded output's beginning and the replayed one's.
    pub recorded: String,
    pub replayed: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.what)?;
        if let Some(at) = self.at {
            write!(f, " at {} µs", at.as_micros())?;
        }
        write!(
            f,
            " diverges\n  recorded: {}\n  replayed: {}",
            self.recorded, self.replayed
        )
    }
}

/// What replaying one segment found.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentReplay {
    pub file: PathBuf,
    /// Whose core it recorded: `control`, or `agent NODE`.
    pub core: String,
    pub inputs: u64,
    pub action_batches: u64,
    pub actions: u64,
    /// The segment ends in an incomplete line (its process was killed while writing).
    pub cut_short: bool,
    pub divergence: Option<Divergence>,
}

/// What went wrong reading a recording.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the recording {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "{path} holds no recording (no control-*.jsonl or agent-*.jsonl files); record with `tokenfab server --record DIR` or `tokenfab agent --record DIR`"
    )]
    Empty { path: String },
    #[error("{path}:{line}: {message}")]
    Format { path: String, line: usize, message: String },
}

/// Replays every segment of the recording in `dir` (or the one segment file `dir`), in
/// order, each through a fresh core. `progress` is told of each segment as it is done.
pub fn replay(dir: &Path, mut progress: impl FnMut(&SegmentReplay)) -> Result<Vec<SegmentReplay>, ReplayError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ReplayError::Io { path, source }
    };
    let files = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        segment_files(dir, None).map_err(io(dir))?
    };
    if files.is_empty() {
        return Err(ReplayError::Empty {
            path: dir.display().to_string(),
        });
    }
    let mut out = Vec::new();
    for file in files {
        let r = replay_segment(&file)?;
        progress(&r);
        out.push(r);
    }
    Ok(out)
}

/// The core a segment replays through.
enum Core {
    Control(Box<ControlCore>),
    Agent(Box<AgentCore>),
}

/// Replays one segment file.
pub fn replay_segment(file: &Path) -> Result<SegmentReplay, ReplayError> {
    let path = file.display().to_string();
    let reader = std::io::BufReader::new(File::open(file).map_err(|source| ReplayError::Io {
        path: path.clone(),
        source,
    })?);
    let mut lines: Vec<String> = Vec::new();
    for l in reader.lines() {
        lines.push(l.map_err(|source| ReplayError::Io {
            path: path.clone(),
            source,
        })?);
    }
    let mut result = SegmentReplay {
        file: file.to_path_buf(),
        core: String::new(),
        inputs: 0,
        action_batches: 0,
        actions: 0,
        cut_short: false,
        divergence: None,
    };
    let format = |line: usize, message: String| ReplayError::Format {
        path: path.clone(),
        line,
        message,
    };
    let mut core: Option<Core> = None;
    let count = lines.len();
    for (i, text) in lines.iter().enumerate() {
        let n = i + 1;
        let line: Line = match serde_json::from_str(text) {
            Ok(l) => l,
            Err(_) if n == count => {
                // A process killed mid-write leaves its last line incomplete.
                result.cut_short = true;
                break;
            }
            Err(e) => return Err(format(n, format!("not a recording line: {e}"))),
        };
        let diverged = |what: String, at, recorded: (String, &str), replayed: (String, String)| {
            Some(Divergence {
                file: file.to_path_buf(),
                line: n,
                what,
                at,
                recorded: format!("[{}] {}", recorded.0, recorded.1),
                replayed: format!("[{}] {}", replayed.0, replayed.1),
            })
        };
        let check_version = |version: u32| {
            if version == VERSION {
                Ok(())
            } else {
                Err(format(
                    n,
                    format!("recorded in format version {version}; this tokenfab replays version {VERSION}"),
                ))
            }
        };
        match line {
            Line::Start {
                version,
                at,
                config,
                state,
            } => {
                check_version(version)?;
                if core.is_some() {
                    return Err(format(n, "a second start line in one segment".into()));
                }
                core = Some(Core::Control(Box::new(ControlCore::start(*config, *state, at))));
                result.core = "control".into();
            }
            Line::StartAgent {
                version,
                at,
                node,
                config,
                replicas,
            } => {
                result.core = format!("agent {node}");
                check_version(version)?;
                if core.is_some() {
                    return Err(format(n, "a second start line in one segment".into()));
                }
                core = Some(Core::Agent(Box::new(AgentCore::new(*config, replicas, at))));
            }
            Line::Input { at, input, reply, head } => {
                let Some(Core::Control(c)) = core.as_mut() else {
                    return Err(format(n, "a control-core input outside a control-core segment".into()));
                };
                let what = input.kind().to_string();
                let got = reply_digest(&c.handle(at, *input));
                result.inputs += 1;
                if got.0 != reply {
                    result.divergence = diverged(what, Some(at), (reply, &head), got);
                    break;
                }
            }
            Line::AgentInput { at, input } => {
                let Some(Core::Agent(c)) = core.as_mut() else {
                    return Err(format(n, "an agent-core input outside an agent-core segment".into()));
                };
                c.handle(at, *input);
                result.inputs += 1;
            }
            Line::Actions { n: count, digest, head } => {
                let (len, got) = match core.as_mut() {
                    None => return Err(format(n, "actions before the start line".into())),
                    Some(Core::Control(c)) => {
                        let actions: Vec<Action> = std::iter::from_fn(|| c.poll_action()).collect();
                        (actions.len(), actions_digest(&actions))
                    }
                    Some(Core::Agent(c)) => {
                        let actions: Vec<AgentAction> = std::iter::from_fn(|| c.poll_action()).collect();
                        (actions.len(), agent_actions_digest(&actions))
                    }
                };
                result.action_batches += 1;
                result.actions += len as u64;
                if got.0 != digest || len != count {
                    result.divergence = diverged(
                        format!("actions ({count} recorded, {len} replayed)"),
                        None,
                        (digest, &head),
                        got,
                    );
                    break;
                }
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokenfab_core::control::{NewBatch, NodeDevice, NodeRegistration, NodeReplica};
    use tokenfab_core::durable::RequestMeta;
    use tokenfab_core::ids::{AcceleratorId, ModelId, NodeId, ReplicaId, SuperNodeId, TenantId};

    fn t(s: u64) -> Timestamp {
        Timestamp::from_micros(1_700_000_000_000_000 + s * 1_000_000)
    }

    /// A small live-like run: a node registers, a batch arrives, work is leased and
    /// reported, time passes; every input goes through the recorder.
    fn run(rec: &mut Recorder, config: ControlConfig) {
        let mut core = ControlCore::start(config.clone(), ControlStart::default(), t(0));
        rec.start(t(0), &config, &ControlStart::default());
        let call = |core: &mut ControlCore, rec: &mut Recorder, at, input: ControlInput| {
            let raw = rec.prepare(&input);
            let reply = core.handle(at, input);
            rec.input(at, raw, &reply);
            let mut actions = Vec::new();
            while let Some(a) = core.poll_action() {
                actions.push(a);
            }
            rec.actions(&actions);
            rec.flush();
            reply
        };
        let node = NodeId::new("n0");
        let model = ModelId::new("llama-3.1-8b");
        call(
            &mut core,
            rec,
            t(1),
            ControlInput::Register(NodeRegistration {
                node: node.clone(),
                super_node: SuperNodeId::new("s0"),
                devices: vec![NodeDevice {
                    index: 0,
                    accelerator: AcceleratorId::new("h100-sxm"),
                    domain: 0,
                }],
                replicas: vec![NodeReplica {
                    replica: ReplicaId::new("r0"),
                    model: model.clone(),
                    devices: vec![0],
                    max_concurrency: 64,
                    window: 8,
                }],
                usd_per_device_hour: None,
            }),
        );
        let requests = (0..20)
            .map(|i| RequestMeta {
                line: i + 1,
                prompt_tokens_estimate: 100 + i,
                max_tokens: Some(50),
                body_bytes: 100,
            })
            .collect();
        call(
            &mut core,
            rec,
            t(2),
            ControlInput::Submit(NewBatch {
                tenant: TenantId::new("acme"),
                model: model.clone(),
                sla_class: None,
                completion_window: Some(Duration::from_secs(3600)),
                metadata: Default::default(),
                endpoint: Default::default(),
                input_bytes: 2000,
                line_error_bytes: 0,
                input_file: None,
                lines: 20,
                invalid_lines: 0,
                requests,
                best_effort_if_late: false,
            }),
        );
        for s in 3..40 {
            call(
                &mut core,
                rec,
                t(s),
                ControlInput::Lease {
                    node: node.clone(),
                    model: model.clone(),
                    max: 2,
                },
            );
            call(&mut core, rec, t(s), ControlInput::Timeout);
        }
    }

    #[test]
    fn a_recording_replays_identically_and_a_changed_decision_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::open(dir.path(), 1 << 30).unwrap();
        run(&mut rec, ControlConfig::default());
        drop(rec);
        let segments = replay(dir.path(), |_| {}).unwrap();
        assert_eq!(segments.len(), 1);
        let s = &segments[0];
        assert_eq!(s.divergence, None, "{:?}", s.divergence);
        assert_eq!(s.inputs, 2 + 37 * 2);
        assert!(s.actions > 0, "the run made the core act");

        // The same inputs through a core that decides differently (leases that live 3 s
        // instead of 10 s: units leased and never reported expire sooner): the replay
        // reports where.
        let file = &segments[0].file;
        let text = std::fs::read_to_string(file).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let mut start: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        start["start"]["config"]["lease_ttl"] = serde_json::json!({"secs": 3, "nanos": 0});
        lines[0] = start.to_string();
        std::fs::write(file, lines.join("\n") + "\n").unwrap();
        let r = replay_segment(file).unwrap();
        let d = r.divergence.expect("a different lease time-to-live changes a decision");
        assert!(d.line > 1, "{d}");
        assert!(d.to_string().contains("diverges"), "{d}");
    }

    #[test]
    fn a_cut_short_segment_replays_its_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::open(dir.path(), 1 << 30).unwrap();
        run(&mut rec, ControlConfig::default());
        drop(rec);
        let file = segment_files(dir.path(), None).unwrap().remove(0);
        let text = std::fs::read_to_string(&file).unwrap();
        // Kill the process in the middle of the last line.
        std::fs::write(&file, &text[..text.len() - 10]).unwrap();
        let r = replay_segment(&file).unwrap();
        assert!(r.cut_short);
        assert_eq!(r.divergence, None);
    }

    #[test]
    fn the_folder_stays_within_its_bound_by_dropping_whole_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::open(dir.path(), 1 << 30).unwrap();
        run(&mut rec, ControlConfig::default());
        drop(rec);
        let one = std::fs::metadata(&segment_files(dir.path(), None).unwrap()[0])
            .unwrap()
            .len();
        // Room for a bit more than two segments.
        let bound = one * 5 / 2;
        for _ in 0..4 {
            let mut rec = Recorder::open(dir.path(), bound).unwrap();
            run(&mut rec, ControlConfig::default());
        }
        let files = segment_files(dir.path(), None).unwrap();
        let total: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
        assert!(total <= bound, "{total} > {bound}");
        assert!(files.len() >= 2, "{files:?}");
        // What is left replays: old segments went whole.
        for s in replay(dir.path(), |_| {}).unwrap() {
            assert_eq!(s.divergence, None, "{}", s.file.display());
        }
        // A bound smaller than one segment: the segment stops, its prefix replays.
        let small = tempfile::tempdir().unwrap();
        let mut rec = Recorder::open(small.path(), one / 3).unwrap();
        run(&mut rec, ControlConfig::default());
        drop(rec);
        let s = &replay(small.path(), |_| {}).unwrap()[0];
        assert_eq!(s.divergence, None);
        assert!(s.inputs > 0 && s.inputs < 2 + 37 * 2, "{}", s.inputs);
    }

    #[test]
    fn a_node_whose_name_extends_another_keeps_its_own_segments() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "agent-n1-1795000000000-0000042-000.jsonl",
            "agent-n1-5-1795000000000-0000042-000.jsonl",
            "agent-n1-notes.jsonl",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names = |prefix| -> Vec<String> {
            segment_files(dir.path(), Some(prefix))
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names("agent-n1"), ["agent-n1-1795000000000-0000042-000.jsonl"]);
        assert_eq!(names("agent-n1-5"), ["agent-n1-5-1795000000000-0000042-000.jsonl"]);
    }

    #[test]
    fn an_empty_folder_says_how_to_record() {
        let dir = tempfile::tempdir().unwrap();
        let e = replay(dir.path(), |_| {}).unwrap_err().to_string();
        assert!(e.contains("--record"), "{e}");
    }
}
