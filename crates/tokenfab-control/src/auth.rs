//! Bearer-token authentication: one token per tenant, one token per node (bound to the
//! node's name, see [`tokenfab_identity`]), and optionally an operator (admin) token that
//! may read every tenant's usage. Tenant and operator tokens are kept only as SHA-256
//! digests.

use tokenfab_core::TenantId;
use tokenfab_identity::{NodeVerifier, digest, same};
use tonic::Status;
use tonic::metadata::MetadataMap;

/// One tenant and its token (or the token's SHA-256 digest).
#[derive(Clone, PartialEq, Eq)]
pub struct TenantToken {
    pub name: String,
    pub digest: [u8; 32],
}

impl TenantToken {
    /// A tenant whose token is given in the clear (kept only as its digest).
    pub fn new(name: impl Into<String>, token: &str) -> Self {
        TenantToken {
            name: name.into(),
            digest: digest(token),
        }
    }

    /// A tenant whose token is known only by its digest.
    pub fn hashed(name: impl Into<String>, digest: [u8; 32]) -> Self {
        TenantToken {
            name: name.into(),
            digest,
        }
    }
}

impl std::fmt::Debug for TenantToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantToken").field("name", &self.name).finish()
    }
}

/// The tokens the control plane accepts.
#[derive(Clone)]
pub struct Auth {
    tenants: Vec<([u8; 32], TenantId)>,
    nodes: NodeVerifier,
    admin: Option<[u8; 32]>,
    /// Agents must also present a client certificate naming their node.
    node_certificates: bool,
}

/// Who a usage query comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Tenant(TenantId),
    /// The operator (admin token).
    Operator,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print tokens, nor their digests.
        f.debug_struct("Auth")
            .field("tenants", &self.tenants.iter().map(|t| &t.1).collect::<Vec<_>>())
            .finish()
    }
}

fn bearer(md: &MetadataMap, who: &str) -> Result<String, Status> {
    let value = md.get("authorization").ok_or_else(|| {
        Status::unauthenticated(format!(
            "missing bearer token: send metadata `authorization: Bearer <{who} token>`"
        ))
    })?;
    let text = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization metadata is not valid ASCII"))?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated(format!("the authorization metadata must be `Bearer <{who} token>`")))?;
    Ok(token.trim().to_string())
}

impl Auth {
    /// `agent_secret` is the cluster's agent secret, from which every node token derives.
    pub fn new(tenants: &[TenantToken], agent_secret: &str) -> Result<Self, tokenfab_identity::IdentityError> {
        Ok(Auth {
            tenants: tenants
                .iter()
                .map(|t| (t.digest, TenantId::new(t.name.clone())))
                .collect(),
            nodes: NodeVerifier::new(agent_secret)?,
            admin: None,
            node_certificates: false,
        })
    }

    /// Agents must also present a (verified) client certificate that names their node.
    pub fn with_node_certificates(mut self, required: bool) -> Self {
        self.node_certificates = required;
        self
    }

    /// An agent call: the node token, and, where required, the client certificate, must
    /// name the node the call is for.
    pub fn node_call<T>(&self, req: &tonic::Request<T>, node: &str) -> Result<(), Status> {
        self.node(req.metadata(), node)?;
        if !self.node_certificates {
            return Ok(());
        }
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated(
                "this control plane requires agents to present a client certificate (mutual TLS); give the agent --tls-cert and --tls-key",
            )
        })?;
        match certs.first() {
            Some(c) if tokenfab_identity::tls::names_node(c, node) => Ok(()),
            _ => Err(Status::permission_denied(format!(
                "the client certificate does not name node '{node}': a node's certificate needs a DNS subject alternative name equal to its node name"
            ))),
        }
    }

    /// Also accepts the token whose digest is `admin` as the operator's (for usage
    /// queries).
    pub fn with_admin(mut self, admin: Option<[u8; 32]>) -> Self {
        self.admin = admin;
        self
    }

    /// The configured tenants, by name.
    pub fn tenant_names(&self) -> Vec<TenantId> {
        let mut names: Vec<TenantId> = self.tenants.iter().map(|(_, n)| n.clone()).collect();
        names.sort();
        names
    }

    /// A tenant, or the operator: for calls the operator may make too.
    pub fn tenant_or_operator(&self, md: &MetadataMap) -> Result<Caller, Status> {
        if let Some(admin) = &self.admin
            && same(admin, &digest(&bearer(md, "tenant or admin")?))
        {
            return Ok(Caller::Operator);
        }
        self.tenant(md).map(Caller::Tenant)
    }

    /// Whether the call carries the operator's token.
    pub fn operator(&self, md: &MetadataMap) -> Result<(), Status> {
        let token = bearer(md, "admin")?;
        match &self.admin {
            Some(admin) if same(admin, &digest(&token)) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "the bearer token is not the operator's admin token",
            )),
            None => Err(Status::permission_denied(
                "this control plane has no admin token configured (--admin-token-file or TOKENFAB_ADMIN_TOKEN); operator calls are off",
            )),
        }
    }

    /// The tenant a request authenticates as.
    pub fn tenant(&self, md: &MetadataMap) -> Result<TenantId, Status> {
        let token = digest(&bearer(md, "tenant")?);
        let mut found = None;
        for (t, name) in &self.tenants {
            if same(t, &token) {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(|| {
            Status::unauthenticated(
                "the bearer token is not valid for any tenant; check the token your operator issued",
            )
        })
    }

    /// Succeeds when a request carries `node`'s token: a node may act only as itself.
    pub fn node(&self, md: &MetadataMap, node: &str) -> Result<(), Status> {
        let token = bearer(md, "node")?;
        if self.nodes.verify(node, &token) {
            return Ok(());
        }
        if self.nodes.is_secret(&token) {
            return Err(Status::unauthenticated(
                "the bearer token is the cluster's agent secret itself, not a node token: a tokenfab agent derives its node token from the secret (upgrade the agent), or give the node its own token (tokenfab admin node-token NAME)",
            ));
        }
        if tokenfab_identity::is_node_token(&token) {
            return Err(Status::permission_denied(format!(
                "the node token is not the token of node '{node}': a node may act only as the node its token names (or the cluster's agent secret changed)"
            )));
        }
        Err(Status::unauthenticated(
            "the bearer token is not a node token of this cluster; give the agent its node token (tokenfab admin node-token NAME) or the cluster's agent secret",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", MetadataValue::try_from(v).unwrap());
        m
    }

    #[test]
    fn tokens_map_to_tenants_and_bad_ones_say_why() {
        let auth = Auth::new(&[TenantToken::new("acme", "s3cret")], "agent-secret").unwrap();
        assert_eq!(auth.tenant(&md("Bearer s3cret")).unwrap(), TenantId::from("acme"));
        let e = auth.tenant(&MetadataMap::new()).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::Unauthenticated,
                "missing bearer token: send metadata `authorization: Bearer <tenant token>`"
            )
        );
        assert!(
            auth.tenant(&md("Bearer nope"))
                .unwrap_err()
                .message()
                .contains("not valid for any tenant")
        );
        assert!(
            auth.tenant(&md("Basic abc"))
                .unwrap_err()
                .message()
                .contains("must be `Bearer")
        );
        assert!(!format!("{auth:?}").contains("s3cret"));
        assert_eq!(
            auth.tenant_or_operator(&md("Bearer s3cret")).unwrap(),
            Caller::Tenant(TenantId::from("acme"))
        );
        assert!(auth.tenant_or_operator(&md("Bearer op")).is_err(), "no admin token set");
        assert_eq!(
            auth.operator(&md("Bearer op")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let auth = auth.with_admin(Some(digest("op")));
        assert_eq!(auth.tenant_or_operator(&md("Bearer op")).unwrap(), Caller::Operator);
        assert!(auth.operator(&md("Bearer op")).is_ok());
        assert!(
            auth.tenant(&md("Bearer op")).is_err(),
            "the admin token is not a tenant"
        );
        // A tenant known only by its token's digest.
        let hashed = Auth::new(&[TenantToken::hashed("beta", digest("b-token"))], "agent-secret").unwrap();
        assert_eq!(hashed.tenant(&md("Bearer b-token")).unwrap(), TenantId::from("beta"));
    }

    #[test]
    fn a_node_acts_only_as_the_node_its_token_names() {
        let auth = Auth::new(&[TenantToken::new("acme", "s3cret")], "agent-secret").unwrap();
        let gpu1 = tokenfab_identity::node_token("agent-secret", "gpu-1");
        assert!(auth.node(&md(&format!("Bearer {gpu1}")), "gpu-1").is_ok());
        let e = auth.node(&md(&format!("Bearer {gpu1}")), "gpu-2").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("may act only as the node its token names"),
            "{}",
            e.message()
        );
        let e = auth.node(&md("Bearer agent-secret"), "gpu-1").unwrap_err();
        assert!(
            e.message().contains("the cluster's agent secret itself"),
            "{}",
            e.message()
        );
        assert!(
            auth.node(&md("Bearer s3cret"), "gpu-1").is_err(),
            "a tenant token is not a node token"
        );
    }
}
