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
    RaftAck, RaftMessages, RaftStatus, RaftStatusRequest, TransferLeaderReply, TransferLeaderRequest,
};
use tokenfab_store::StoreError;
use tokio::sync::{mpsc, oneshot, watch};

/// The largest message on the peer port (a batch of Raft messages; entries are at most a
/// part each, and a leader sends at most 4 MiB of entries per message).
const MAX_MESSAGE: usize = 64 << 20;

struct Peer {
    id: u64,
    inbox: mpsc::Sender<Message>,
    status: watch::Receiver<GroupStatus>,
    cmds: mpsc::Sender<Cmd>,
}

#[tonic::async_trait]
impl RaftPeer for Peer {
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
    id: u64,
    inbox: mpsc::Sender<Message>,
    status: watch::Receiver<GroupStatus>,
    cmds: mpsc::Sender<Cmd>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
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
    let service = RaftPeerServer::new(Peer {
        id,
        inbox,
        status,
        cmds,
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let _ = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
            .await;
    }))
}

async fn connect(url: &str) -> Result<RaftPeerClient<tonic::transport::Channel>, String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(RaftPeerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Sends the messages `rx` yields to the replica at `url`, over one stream, opened again
/// after each failure; messages that queue while the peer is unreachable are dropped.
pub(crate) async fn link(url: String, mut rx: mpsc::Receiver<Message>) {
    loop {
        let mut client = match connect(&url).await {
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
pub async fn status(url: &str) -> Result<GroupStatus, String> {
    let mut c = connect(url).await?;
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
    })
}

/// Asks the replica at `url` to hand leadership to `to`: (it led, the leader it knows).
pub async fn transfer(url: &str, to: u64) -> Result<(bool, u64), String> {
    let mut c = connect(url).await?;
    let r = c
        .transfer_leader(TransferLeaderRequest { to })
        .await
        .map_err(|e| format!("{url}: {}", e.message()))?
        .into_inner();
    Ok((r.accepted, r.leader))
}
