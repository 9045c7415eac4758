//! Bearer-token authentication: one token per tenant, one shared token for agents, and
//! optionally an operator (admin) token that may read every tenant's usage.

use serde::Deserialize;
use tokenfab_core::TenantId;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// One tenant and its token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantToken {
    pub name: String,
    pub token: String,
}

/// The tokens the control plane accepts.
#[derive(Clone, Default)]
pub struct Auth {
    tenants: Vec<(Vec<u8>, TenantId)>,
    agent_token: Vec<u8>,
    admin_token: Option<Vec<u8>>,
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
        // Never print tokens.
        f.debug_struct("Auth")
            .field("tenants", &self.tenants.iter().map(|t| &t.1).collect::<Vec<_>>())
            .finish()
    }
}

/// Compares without leaking, through timing, how long a matching prefix is.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(md: &MetadataMap, who: &str) -> Result<Vec<u8>, Status> {
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
    Ok(token.trim().as_bytes().to_vec())
}

impl Auth {
    pub fn new(tenants: &[TenantToken], agent_token: &str) -> Self {
        Auth {
            tenants: tenants
                .iter()
                .map(|t| (t.token.as_bytes().to_vec(), TenantId::new(t.name.clone())))
                .collect(),
            agent_token: agent_token.as_bytes().to_vec(),
            admin_token: None,
        }
    }

    /// Also accepts `admin` as the operator's token (for usage queries).
    pub fn with_admin(mut self, admin: Option<&str>) -> Self {
        self.admin_token = admin.filter(|a| !a.trim().is_empty()).map(|a| a.as_bytes().to_vec());
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
        if let Some(admin) = &self.admin_token
            && same(admin, &bearer(md, "tenant or admin")?)
        {
            return Ok(Caller::Operator);
        }
        self.tenant(md).map(Caller::Tenant)
    }

    /// The tenant a request authenticates as.
    pub fn tenant(&self, md: &MetadataMap) -> Result<TenantId, Status> {
        let token = bearer(md, "tenant")?;
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

    /// Succeeds when a request carries the agent token.
    pub fn agent(&self, md: &MetadataMap) -> Result<(), Status> {
        let token = bearer(md, "agent")?;
        if !self.agent_token.is_empty() && same(&self.agent_token, &token) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "the bearer token is not the cluster's agent token; check --agent-token",
            ))
        }
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
        let auth = Auth::new(
            &[TenantToken {
                name: "acme".into(),
                token: "s3cret".into(),
            }],
            "agent-t",
        );
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
        assert!(auth.agent(&md("Bearer agent-t")).is_ok());
        assert!(
            auth.agent(&md("Bearer s3cret")).is_err(),
            "a tenant token is not an agent token"
        );
        assert!(!format!("{auth:?}").contains("s3cret"));
        assert_eq!(
            auth.tenant_or_operator(&md("Bearer s3cret")).unwrap(),
            Caller::Tenant(TenantId::from("acme"))
        );
        assert!(auth.tenant_or_operator(&md("Bearer op")).is_err(), "no admin token set");
        let auth = auth.with_admin(Some("op"));
        assert_eq!(auth.tenant_or_operator(&md("Bearer op")).unwrap(), Caller::Operator);
        assert!(
            auth.tenant(&md("Bearer op")).is_err(),
            "the admin token is not a tenant"
        );
    }
}
