//! `tokenfab admin`: operator tasks that need no running control plane, or only its
//! data directory.

use crate::parse;
use anyhow::bail;
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
}

pub async fn run(c: AdminCommand) -> anyhow::Result<()> {
    match c {
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
