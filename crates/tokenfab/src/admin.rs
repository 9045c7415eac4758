//! `tokenfab admin`: operator tasks that need no running control plane, or only its
//! data directory.

use crate::parse;
use anyhow::{Context, bail};
use clap::Subcommand;
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Print a node's token: the agent on that node authenticates with it and can act
    /// only as that node (give it with --agent-token-file). Derived from the cluster's
    /// agent secret, so the control plane needs no list of nodes; rotating the secret
    /// revokes every node token.
    NodeToken {
        /// The node's name, as the agent registers it (--node).
        node: String,
        /// A file whose first line is the cluster's agent secret (default: the
        /// TOKENFAB_AGENT_TOKEN environment variable).
        #[arg(long, env = "TOKENFAB_AGENT_TOKEN_FILE")]
        agent_token_file: Option<PathBuf>,
    },
    /// Print the SHA-256 digest of a tenant (or operator) token read from standard input,
    /// as a tenants-file entry: the control plane can then hold the digest, never the
    /// token.
    HashToken {
        /// The tenant's name, for the printed entry.
        #[arg(long, default_value = "NAME")]
        tenant: String,
    },
    /// Take a consistent backup of a running control plane (every batch, request, result
    /// and error, the metering history, and the inputs of unfinished batches) into FILE,
    /// while it keeps serving. Needs the admin token.
    Backup {
        /// Where to write the backup (written to FILE.part, then renamed).
        #[arg(short, long)]
        output: PathBuf,
        /// Control plane gRPC URL.
        #[arg(long, env = "TOKENFAB_CONTROL", default_value = "http://127.0.0.1:7443")]
        control: String,
        /// A file whose first line is the admin token (default: TOKENFAB_ADMIN_TOKEN).
        #[arg(long, env = "TOKENFAB_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        /// With an https:// URL: the CA certificate (PEM) of the control plane.
        #[arg(long, env = "TOKENFAB_TLS_CA")]
        tls_ca: Option<PathBuf>,
    },
    /// Write a new data directory from a backup (offline; the directory must not hold a
    /// store). Start the control plane on it afterwards.
    Restore {
        /// The backup file.
        backup: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Check a data directory (offline: stop its control plane first): every record must
    /// read back and fit with the others. With --salvage DIR, write a new store there
    /// from everything that can be read. Exits with 1 when it finds problems.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
        /// An empty directory to write the salvaged store to.
        #[arg(long)]
        salvage: Option<PathBuf>,
    },
    /// Give space freed by deleted batches back to the filesystem (offline: stop the
    /// control plane first). The store reuses freed space by itself; this shrinks its file.
    Compact {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// The replicas of a replicated control plane: which one serves, which wait or
    /// follow. On etcd (`server --store etcd`, give --etcd-endpoints) a replica joins by
    /// starting with the same --etcd-prefix and leaves by stopping; --step-down makes the
    /// elected replica step down and exit (its supervisor restarts it as a waiting one)
    /// while a waiting replica takes over. On Raft (`server --store raft`, give
    /// --raft-peers) each member reports its role, term and log positions; --transfer-to ID
    /// hands leadership to that member (the old leader exits and follows after its
    /// restart): to move the service off a machine before maintenance.
    Members {
        /// etcd's client URLs, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            env = "TOKENFAB_ETCD_ENDPOINTS",
            conflicts_with = "raft_peers"
        )]
        etcd_endpoints: Vec<String>,
        /// The control plane's key prefix (the servers' --etcd-prefix).
        #[arg(long, default_value = "/tokenfab")]
        etcd_prefix: String,
        /// Ask the elected replica to step down (etcd).
        #[arg(long)]
        step_down: bool,
        /// The Raft group's members, ID=URL of each peer port, comma-separated (the
        /// servers' --raft-peers).
        #[arg(long, env = "TOKENFAB_RAFT_PEERS")]
        raft_peers: Option<String>,
        /// Hand leadership to this member (Raft).
        #[arg(long, requires = "raft_peers", conflicts_with_all = ["add", "remove"])]
        transfer_to: Option<u64>,
        /// Add a member, ID=URL of its peer port (Raft). Start it first, with --raft-peers
        /// naming every member and itself; it follows once the group has added it.
        #[arg(long, requires = "raft_peers", conflicts_with = "remove")]
        add: Option<String>,
        /// Remove a member by its id (Raft); it stops. To remove the leader, hand
        /// leadership to another member first (--transfer-to).
        #[arg(long, requires = "raft_peers")]
        remove: Option<u64>,
        #[command(flatten)]
        raft_tls: crate::serve::RaftTlsArgs,
    },
}

pub async fn run(c: AdminCommand) -> anyhow::Result<()> {
    match c {
        AdminCommand::Members {
            etcd_endpoints,
            etcd_prefix,
            step_down,
            raft_peers,
            transfer_to,
            add,
            remove,
            raft_tls,
        } => match raft_peers {
            Some(peers) => {
                let change = match (add, remove) {
                    (Some(a), _) => Some(Ok(a)),
                    (None, Some(r)) => Some(Err(r)),
                    (None, None) => None,
                };
                raft_members(&peers, transfer_to, change, raft_tls).await?
            }
            None if etcd_endpoints.is_empty() => bail!(
                "admin members: give --etcd-endpoints URL[,URL...] (replicas on etcd) or --raft-peers ID=URL[,ID=URL...] (a Raft group)"
            ),
            None => members(etcd_endpoints, &etcd_prefix, step_down).await?,
        },
        AdminCommand::Backup {
            output,
            control,
            admin_token_file,
            tls_ca,
        } => backup(&output, &control, admin_token_file.as_deref(), tls_ca.as_deref()).await?,
        AdminCommand::Restore { backup, data_dir } => {
            let file = std::fs::File::open(&backup).with_context(|| format!("cannot open {}", backup.display()))?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            let bar = bytes_bar(size, "restoring");
            let reader = bar.wrap_read(file);
            let s = tokio::task::spawn_blocking(move || {
                tokenfab_store::backup::restore(reader, &data_dir).map(|s| (s, data_dir))
            })
            .await?;
            bar.finish_and_clear();
            let (s, data_dir) = s.with_context(|| format!("restoring {}", backup.display()))?;
            println!(
                "restored {} batches, {} requests, {} results and {} of inputs into {}",
                s.batches,
                s.requests,
                s.results,
                tokenfab_core::usage::human_bytes(s.input_bytes),
                data_dir.display()
            );
        }
        AdminCommand::Verify { data_dir, salvage } => {
            let r = tokenfab_store::backup::verify(&data_dir, salvage.as_deref())
                .with_context(|| format!("verifying {}", data_dir.display()))?;
            let read: Vec<String> = r.read.iter().map(|(t, n)| format!("{t} {n}")).collect();
            println!("read: {}", read.join(", "));
            for p in r.problems.iter().take(50) {
                println!("  {}: {}", p.at, p.what);
            }
            if r.problems.len() > 50 {
                println!("  ... {} more", r.problems.len() - 50);
            }
            if let Some(out) = &salvage {
                let written: Vec<String> = r.salvaged.iter().map(|(t, n)| format!("{t} {n}")).collect();
                println!("salvaged into {}: {}", out.display(), written.join(", "));
                if r.inputs_lost > 0 {
                    println!(
                        "  {} requests whose input could not be read end with the error input_lost",
                        r.inputs_lost
                    );
                }
            }
            if r.problems.is_empty() {
                println!("no problems found");
            } else {
                println!("{} problems found", r.problems.len());
                std::process::exit(1);
            }
        }
        AdminCommand::Compact { data_dir } => {
            let (before, after) = tokenfab_store::backup::compact(&data_dir)?;
            println!(
                "compacted {}: {} -> {}",
                data_dir.display(),
                tokenfab_core::usage::human_bytes(before),
                tokenfab_core::usage::human_bytes(after)
            );
        }
        AdminCommand::NodeToken { node, agent_token_file } => {
            let secret = match agent_token_file {
                Some(f) => parse::secret_file(&f, "agent secret")?,
                None => match std::env::var("TOKENFAB_AGENT_TOKEN") {
                    Ok(s) if !s.trim().is_empty() => s,
                    _ => bail!(
                        "the cluster's agent secret is needed: --agent-token-file FILE or TOKENFAB_AGENT_TOKEN (the same the control plane runs with)"
                    ),
                },
            };
            if node.trim().is_empty() {
                bail!("the node name is empty; give the name the agent registers with (--node)");
            }
            println!("{}", tokenfab_identity::node_token(secret.trim(), &node));
        }
        AdminCommand::HashToken { tenant } => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let token = line.trim();
            if token.is_empty() {
                bail!(
                    "no token on standard input: run e.g. `printf %s \"$TOKEN\" | tokenfab admin hash-token --tenant acme`"
                );
            }
            println!("[[tenants]]");
            println!("name = \"{tenant}\"");
            println!(
                "token_sha256 = \"{}\"",
                tokenfab_identity::hex(&tokenfab_identity::digest(token))
            );
        }
    }
    Ok(())
}

fn bytes_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = if total > 0 {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

async fn backup(
    output: &std::path::Path,
    control: &str,
    token_file: Option<&std::path::Path>,
    tls_ca: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let token = match token_file {
        Some(f) => parse::secret_file(f, "admin token")?,
        None => std::env::var("TOKENFAB_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .context("the admin token is needed: --admin-token-file FILE or TOKENFAB_ADMIN_TOKEN")?,
    };
    let mut endpoint = tonic::transport::Channel::from_shared(control.to_string())
        .with_context(|| format!("--control {control} is not a valid URL"))?;
    if control.starts_with("https://") {
        endpoint = endpoint.tls_config(tokenfab_identity::tls::grpc_client(tls_ca, None)?)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {control}"))?;
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .context("the admin token is not valid ASCII")?;
    let mut client = tokenfab_proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", value.clone());
            Ok(r)
        },
    )
    .max_decoding_message_size(16 << 20);
    let mut stream = client
        .backup(tokenfab_proto::v1::BackupRequest {})
        .await
        .map_err(crate::tenant::rpc)?
        .into_inner();
    let part = output.with_extension("part");
    let mut file = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    let bar = bytes_bar(0, "backing up");
    let mut written = 0u64;
    while let Some(chunk) = stream.message().await.map_err(crate::tenant::rpc)? {
        file.write_all(&chunk.data).await?;
        written += chunk.data.len() as u64;
        bar.set_position(written);
    }
    file.sync_all().await?;
    drop(file);
    bar.finish_and_clear();
    // Read it back before it replaces anything: every record and its end mark.
    let check = part.clone();
    let checked = tokio::task::spawn_blocking(move || -> anyhow::Result<tokenfab_store::backup::BackupSummary> {
        Ok(tokenfab_store::backup::check(std::fs::File::open(&check)?)?)
    })
    .await??;
    std::fs::rename(&part, output)?;
    println!(
        "backup written to {} ({}): {} batches, {} requests, {} results, {} of inputs; read back and checked",
        output.display(),
        tokenfab_core::usage::human_bytes(written),
        checked.batches,
        checked.requests,
        checked.results,
        tokenfab_core::usage::human_bytes(checked.input_bytes)
    );
    Ok(())
}

#[cfg(feature = "etcd")]
async fn members(endpoints: Vec<String>, prefix: &str, step_down: bool) -> anyhow::Result<()> {
    if step_down {
        let leader = tokenfab_store_etcd::step_down(&endpoints, prefix).await?;
        println!("asked {leader} to step down: it does within a third of its lease, and a waiting replica is elected");
        return Ok(());
    }
    let members = tokenfab_store_etcd::members(&endpoints, prefix).await?;
    if members.is_empty() {
        println!("no replica runs under {prefix}");
    }
    for m in members {
        println!("{}\t{}", m.name, if m.leader { "elected (serves)" } else { "waiting" });
    }
    Ok(())
}

#[cfg(feature = "raft")]
async fn raft_members(
    peers: &str,
    transfer_to: Option<u64>,
    change: Option<Result<String, u64>>,
    tls: crate::serve::RaftTlsArgs,
) -> anyhow::Result<()> {
    let peers =
        tokenfab_store_raft::RaftOptions::parse_peers(peers).map_err(|e| anyhow::anyhow!("--raft-peers: {e}"))?;
    let tls = tls.load()?;
    if let Some(change) = change {
        let (change, what) = match change {
            Ok(spec) => {
                let added =
                    tokenfab_store_raft::RaftOptions::parse_peers(&spec).map_err(|e| anyhow::anyhow!("--add: {e}"))?;
                let Some((id, url)) = added.into_iter().next().filter(|_| !spec.contains(',')) else {
                    bail!("--add: give one member, ID=URL")
                };
                if peers.contains_key(&id) {
                    bail!("--add: {id} is already a member (--raft-peers names it)");
                }
                (Ok((id, url.clone())), format!("added {id} ({url})"))
            }
            Err(id) => (Err(id), format!("removed {id}")),
        };
        let leader = tokenfab_store_raft::change_members(&peers, change, tls.as_ref())
            .await
            .map_err(|e| anyhow::anyhow!("the membership was not changed: {e}"))?;
        println!(
            "replica {leader} (the leader) {what}; give every replica the new --raft-peers list at its next restart"
        );
        return Ok(());
    }
    if let Some(to) = transfer_to {
        let leader = tokenfab_store_raft::transfer_leader(&peers, to, tls.as_ref())
            .await
            .map_err(|e| anyhow::anyhow!("cannot transfer leadership to {to}: {e}"))?;
        println!(
            "asked replica {leader} to hand leadership to {to}: it does within an election timeout if {to} is up to date (run `admin members` to see)"
        );
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["ID", "NAME", "ROLE", "TERM", "COMMITTED", "APPLIED", "PEER URL"]);
    for (id, url, status) in tokenfab_store_raft::members(&peers, tls.as_ref()).await {
        match status {
            Ok(s) => table.add_row([
                id.to_string(),
                s.name,
                if s.role == "leader" {
                    "leader (serves)".to_string()
                } else {
                    s.role.to_string()
                },
                s.term.to_string(),
                s.commit.to_string(),
                s.applied.to_string(),
                url,
            ]),
            Err(e) => table.add_row([
                id.to_string(),
                "-".into(),
                format!("unreachable: {e}"),
                "-".into(),
                "-".into(),
                "-".into(),
                url,
            ]),
        };
    }
    println!("{table}");
    Ok(())
}

#[cfg(not(feature = "raft"))]
async fn raft_members(
    _peers: &str,
    _transfer_to: Option<u64>,
    _change: Option<Result<String, u64>>,
    _tls: crate::serve::RaftTlsArgs,
) -> anyhow::Result<()> {
    bail!(
        "admin members --raft-peers: this tokenfab was built without the Raft backend; build it with `cargo build --release --features raft` (which needs protoc: apt-get install protobuf-compiler)"
    )
}

#[cfg(not(feature = "etcd"))]
async fn members(_endpoints: Vec<String>, _prefix: &str, _step_down: bool) -> anyhow::Result<()> {
    bail!(
        "admin members: this tokenfab was built without the etcd backend; build it with `cargo build --release --features etcd` (which needs protoc: apt-get install protobuf-compiler)"
    )
}
