//! The peer port: Raft messages between replicas over gRPC (`tokenfab.v1.RaftPeer`).
//!
//! Each replica keeps one client stream open to every other replica ([`link`]) and
//! serves the streams of the others ([`serve`]). A message that cannot be sent at once
//! (the peer is down, or its stream is full) is dropped and the peer reported
//! unreachable: Raft sends again what a follower lacks, so nothing waits on a dead peer.

use crate::{Cmd, GroupStatus};
use protobuf::Message as _;
use raft::prelude::Message;
use std::net::SocketAddr;
use std::time::Duration;
use tokenfab_proto::v1::raft_peer_client::RaftPeerClient;
use tokenfab_proto::v1::raft_peer_server::{RaftPeer, RaftPeerServer};
use tokenfab_proto::v1::{
    ChangeMembersReply, ChangeMembersRequest, FetchSnapshotRequest, RaftAck, RaftMessages, RaftStatus,
    RaftStatusRequest, SnapshotChunk, TransferLeaderReply, TransferLeaderRequest,
};
use tokenfab_store::StoreError;
use tokio::sync::{mpsc, oneshot, watch};

/// Mutual TLS on the peer port: this replica's certificate and key, and the CA that signs
/// every replica's certificate. Each side proves itself to the other: a replica refuses a
/// peer (or an `admin members` call) without a certificate from that CA.
#[derive(Clone)]
pub struct PeerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl PeerTls {
    /// Reads PEM files; an error names the file.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Result<Self, String> {
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p).map_err(|e| format!("cannot read the {what} {}: {e}", p.display()))
        };
        Ok(PeerTls {
            cert: read(cert, "peer certificate")?,
            key: read(key, "peer key")?,
            ca: read(ca, "peers' CA certificate")?,
        })
    }

    /// From PEM text (tests).
    pub fn from_pem(cert: &str, key: &str, ca: &str) -> Self {
        PeerTls {
            cert: cert.as_bytes().to_vec(),
            key: key.as_bytes().to_vec(),
            ca: ca.as_bytes().to_vec(),
        }
    }

    fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert, &self.key)
    }

    fn ca(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(&self.ca)
    }
}

/// The largest message on the peer port (a batch of Raft messages; entries are at most a
/// part each, and a leader sends at most 4 MiB of entries per message).
const MAX_MESSAGE: usize = 64 << 20;

/// The peer port's service: what it needs of the replica.
pub(crate) struct Peer {
    pub(crate) id: u64,
    pub(crate) inbox: mpsc::Sender<Message>,
    pub(crate) status: watch::Receiver<GroupStatus>,
    pub(crate) cmds: mpsc::Sender<Cmd>,
    /// The store snapshots are taken from; emptied when the replica stops (connections
    /// of peers may outlive it, and must not keep its database open).
    pub(crate) local: std::sync::Arc<std::sync::Mutex<Option<tokenfab_store::RedbStore>>>,
    pub(crate) shared: std::sync::Arc<crate::Shared>,
}

/// A `Write` that sends what is written as snapshot chunks down a gRPC stream.
struct ChunkWriter {
    tx: mpsc::Sender<Result<SnapshotChunk, tonic::Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(SnapshotChunk { data: data.into() }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the follower went away"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Snapshot chunks are about this large.
const CHUNK: usize = 1 << 20;

#[tonic::async_trait]
impl RaftPeer for Peer {
    type FetchSnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotChunk, tonic::Status>>;

    async fn fetch_snapshot(
        &self,
        request: tonic::Request<FetchSnapshotRequest>,
    ) -> Result<tonic::Response<Self::FetchSnapshotStream>, tonic::Status> {
        let min = request.into_inner().min_index;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.shared.applied_commit.load(std::sync::atomic::Ordering::Acquire) < min {
            if tokio::time::Instant::now() >= deadline {
                return Err(tonic::Status::unavailable(format!(
                    "this replica has not applied log entry {min} yet; ask again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tx, rx) = mpsc::channel(4);
        let local = self
            .local
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .ok_or_else(|| tonic::Status::unavailable("this replica is stopping"))?;
        tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
            };
            let r = local
                .backup(&mut w)
                .map_err(|e| e.to_string())
                .and_then(|_| std::io::Write::flush(&mut w).map_err(|e| e.to_string()));
            if let Err(e) = r {
                let _ = tx.blocking_send(Err(tonic::Status::internal(format!("taking the snapshot: {e}"))));
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn deliver(
        &self,
        request: tonic::Request<tonic::Streaming<RaftMessages>>,
    ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            for bytes in batch.messages {
                let m = Message::parse_from_bytes(&bytes)
                    .map_err(|e| tonic::Status::invalid_argument(format!("not a Raft message: {e}")))?;
                if m.to != self.id {
                    return Err(tonic::Status::invalid_argument(format!(
                        "a message for replica {} reached replica {}: the members' --raft-peers disagree; give every replica the same list",
                        m.to, self.id
                    )));
                }
                if self.inbox.send(m).await.is_err() {
                    return Err(tonic::Status::unavailable("this replica is stopping"));
                }
            }
        }
        Ok(tonic::Response::new(RaftAck {}))
    }

    async fn status(
        &self,
        _request: tonic::Request<RaftStatusRequest>,
    ) -> Result<tonic::Response<RaftStatus>, tonic::Status> {
        let s = self.status.borrow().clone();
        Ok(tonic::Response::new(RaftStatus {
            id: s.id,
            name: s.name,
            leader: s.leader,
            term: s.term,
            role: s.role.to_string(),
            commit: s.commit,
            applied: s.applied,
            voters: s.voters,
            snapshots_installed: s.snapshots_installed,
            first_index: s.first_index,
        }))
    }

    async fn change_members(
        &self,
        request: tonic::Request<ChangeMembersRequest>,
    ) -> Result<tonic::Response<ChangeMembersReply>, tonic::Status> {
        let r = request.into_inner();
        let change = match (r.add_id, r.remove_id) {
            (0, 0) | (1.., 1..) => {
                return Err(tonic::Status::invalid_argument(
                    "give either add_id with add_url, or remove_id",
                ));
            }
            (add, 0) => {
                if !(r.add_url.starts_with("http://") || r.add_url.starts_with("https://")) {
                    return Err(tonic::Status::invalid_argument(format!(
                        "add_url {:?}: want http(s)://HOST:PORT",
                        r.add_url
                    )));
                }
                Ok((add, r.add_url))
            }
            (0, remove) => Err(remove),
        };
        let (reply, answer) = oneshot::channel();
        self.cmds
            .send(Cmd::ChangeMembers { change, reply })
            .await
            .map_err(|_| tonic::Status::unavailable("this replica is stopping"))?;
        let waiting = answer
            .await
            .map_err(|_| tonic::Status::unavailable("this replica is stopping"))?;
        let leader = self.status.borrow().leader;
        let Some(done) = waiting else {
            return Ok(tonic::Response::new(ChangeMembersReply {
                accepted: false,
                leader,
                error: String::new(),
            }));
        };
        let error = match tokio::time::timeout(Duration::from_secs(10), done).await {
            Ok(Ok(Ok(()))) => String::new(),
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(_)) => "the replica stopped before the change was applied".into(),
            Err(_) => "the change was not committed within 10 s (is a majority of the members up?)".into(),
        };
        Ok(tonic::Response::new(ChangeMembersReply {
            accepted: true,
            leader: self.id,
            error,
        }))
    }

    async fn transfer_leader(
        &self,
        request: tonic::Request<TransferLeaderRequest>,
    ) -> Result<tonic::Response<TransferLeaderReply>, tonic::Status> {
        let (reply, answer) = oneshot::channel();
        self.cmds
            .send(Cmd::Transfer {
                to: request.into_inner().to,
                reply,
            })
            .await
            .map_err(|_| tonic::Status::unavailable("this replica is stopping"))?;
        let (accepted, leader) = answer
            .await
            .map_err(|_| tonic::Status::unavailable("this replica is stopping"))?;
        Ok(tonic::Response::new(TransferLeaderReply { accepted, leader }))
    }
}

/// Serves the peer port on `listen` until `stop`.
pub(crate) async fn serve(
    listen: SocketAddr,
    peer: Peer,
    tls: Option<&PeerTls>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(t) = tls {
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(t.identity())
                    .client_ca_root(t.ca()),
            )
            .map_err(|e| StoreError::Open {
                path: format!("peer port {listen}"),
                cause: format!("the peer TLS certificate, key or CA is not usable: {e}"),
            })?;
    }
    // A store of this process that was just dropped may hold the port a moment longer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => break l,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(StoreError::Open {
                    path: format!("peer port {listen}"),
                    cause: format!("{e}; is another replica or program listening there? (--raft-listen)"),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let service = RaftPeerServer::new(peer)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let _ = builder
            .add_service(service)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
            .await;
    }))
}

/// A channel to the peer port at `url` (over mutual TLS with `tls`).
async fn channel(url: &str, tls: Option<&PeerTls>, connect: Duration) -> Result<tonic::transport::Channel, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(connect)
        .tcp_nodelay(true);
    if let Some(t) = tls {
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(t.ca())
                    .identity(t.identity()),
            )
            .map_err(|e| format!("{url}: {e}"))?;
    }
    endpoint.connect().await.map_err(|e| format!("{url}: {e}"))
}

async fn connect(url: &str, tls: Option<&PeerTls>) -> Result<RaftPeerClient<tonic::transport::Channel>, String> {
    let channel = channel(url, tls, Duration::from_millis(500)).await?;
    Ok(RaftPeerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Sends the messages `rx` yields to the replica at `url`, over one stream, opened again
/// after each failure; messages that queue while the peer is unreachable are dropped.
pub(crate) async fn link(url: String, tls: Option<PeerTls>, mut rx: mpsc::Receiver<Message>) {
    loop {
        let mut client = match connect(&url, tls.as_ref()).await {
            Ok(c) => c,
            Err(_) => {
                // Raft sends again what the peer lacks once it is back.
                while rx.try_recv().is_ok() {}
                if rx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tx, out) = mpsc::channel::<RaftMessages>(64);
        let mut call =
            tokio::spawn(async move { client.deliver(tokio_stream::wrappers::ReceiverStream::new(out)).await });
        loop {
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = &mut call => break,
            };
            let Some(first) = first else {
                call.abort();
                return;
            };
            let mut batch = Vec::with_capacity(16);
            for m in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()).take(255)) {
                if let Ok(bytes) = m.write_to_bytes() {
                    batch.push(bytes.into());
                }
            }
            if tx.send(RaftMessages { messages: batch }).await.is_err() {
                break;
            }
        }
        call.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The peer `Status` of the replica at `url`.
pub async fn status(url: &str, tls: Option<&PeerTls>) -> Result<GroupStatus, String> {
    let mut c = connect(url, tls).await?;
    let s = c
        .status(RaftStatusRequest {})
        .await
        .map_err(|e| format!("{url}: {}", e.message()))?
        .into_inner();
    Ok(GroupStatus {
        id: s.id,
        name: s.name,
        leader: s.leader,
        term: s.term,
        role: match s.role.as_str() {
            "leader" => "leader",
            "follower" => "follower",
            "candidate" => "candidate",
            "pre-candidate" => "pre-candidate",
            _ => "unknown",
        },
        commit: s.commit,
        applied: s.applied,
        voters: s.voters,
        serving: None,
        failed: None,
        snapshots_installed: s.snapshots_installed,
        first_index: s.first_index,
    })
}

/// Asks the replica at `url` to hand leadership to `to`: (it led, the leader it knows).
pub async fn transfer(url: &str, to: u64, tls: Option<&PeerTls>) -> Result<(bool, u64), String> {
    let mut c = connect(url, tls).await?;
    let r = c
        .transfer_leader(TransferLeaderRequest { to })
        .await
        .map_err(|e| format!("{url}: {}", e.message()))?
        .into_inner();
    Ok((r.accepted, r.leader))
}

/// Fetches the store of the replica at `url` (at least at log entry `min_index`) into
/// `file`; its size in bytes.
pub(crate) async fn fetch_snapshot(
    url: &str,
    tls: Option<&PeerTls>,
    min_index: u64,
    file: &std::path::Path,
) -> Result<u64, StoreError> {
    let fail = |e: String| StoreError::Io(format!("raft: fetching a snapshot from {url}: {e}"));
    let channel = channel(url, tls, Duration::from_secs(2)).await.map_err(fail)?;
    let mut client = RaftPeerClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let mut stream = client
        .fetch_snapshot(FetchSnapshotRequest { min_index })
        .await
        .map_err(|e| fail(e.message().to_string()))?
        .into_inner();
    let mut out = tokio::fs::File::create(file).await.map_err(|e| fail(e.to_string()))?;
    let mut bytes = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|e| fail(e.message().to_string()))? {
        tokio::io::AsyncWriteExt::write_all(&mut out, &chunk.data)
            .await
            .map_err(|e| fail(e.to_string()))?;
        bytes += chunk.data.len() as u64;
    }
    out.sync_all().await.map_err(|e| fail(e.to_string()))?;
    Ok(bytes)
}

/// Asks the replica at `url` to change the members: (it led, the leader it knows, why the
/// change failed or empty).
pub async fn change_members(
    url: &str,
    change: &Result<(u64, String), u64>,
    tls: Option<&PeerTls>,
) -> Result<(bool, u64, String), String> {
    let mut c = connect(url, tls).await?;
    let request = match change {
        Ok((id, u)) => ChangeMembersRequest {
            add_id: *id,
            add_url: u.clone(),
            remove_id: 0,
        },
        Err(id) => ChangeMembersRequest {
            add_id: 0,
            add_url: String::new(),
            remove_id: *id,
        },
    };
    let r = c
        .change_members(request)
        .await
        .map_err(|e| format!("{url}: {}", e.message()))?
        .into_inner();
    Ok((r.accepted, r.leader, r.error))
}
