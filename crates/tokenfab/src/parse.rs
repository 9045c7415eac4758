//! Parsers for command-line values, with errors that say what is expected.

use std::time::Duration;

/// A duration like `24h`, `90m`, `30s`, `1d 12h`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration ({e}); write e.g. 24h, 90m, 30s or 1d"))
}

/// `NAME=VALUE`.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not NAME=VALUE")),
    }
}

/// One `--sla-class`: `NAME` (committed) or `NAME:best-effort`.
pub fn sla_class(s: &str) -> Result<tokenfab_core::control::SlaClass, String> {
    use tokenfab_core::control::SlaClass;
    match s.split_once(':') {
        None if !s.is_empty() => Ok(SlaClass::committed(s)),
        Some((name, "best-effort")) if !name.is_empty() => Ok(SlaClass::best_effort(name)),
        _ => Err(format!(
            "'{s}' is not an SLA class; write NAME for a committed class or NAME:best-effort"
        )),
    }
}

/// One `--replica` of an agent: comma-separated `key=value` pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaArg {
    pub url: String,
    pub model: String,
    pub id: Option<String>,
    pub engine_model: Option<String>,
    pub window: Option<u32>,
    pub max_concurrency: Option<u32>,
}

pub const REPLICA_HELP: &str = "url=URL,model=MODEL[,id=ID][,engine-model=NAME][,window=N][,max=N]";

pub fn replica(s: &str) -> Result<ReplicaArg, String> {
    let mut r = ReplicaArg {
        url: String::new(),
        model: String::new(),
        id: None,
        engine_model: None,
        window: None,
        max_concurrency: None,
    };
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' in --replica is not key=value; expected {REPLICA_HELP}"))?;
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{k}={v}: expected a whole number"))
        };
        match k {
            "url" => r.url = v.trim_end_matches('/').to_string(),
            "model" => r.model = v.to_string(),
            "id" => r.id = Some(v.to_string()),
            "engine-model" => r.engine_model = Some(v.to_string()),
            "window" => r.window = Some(number(v)?),
            "max" => r.max_concurrency = Some(number(v)?),
            other => {
                return Err(format!("unknown key '{other}' in --replica; expected {REPLICA_HELP}"));
            }
        }
    }
    if r.url.is_empty() || r.model.is_empty() {
        return Err(format!("--replica needs url= and model=; expected {REPLICA_HELP}"));
    }
    if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
        return Err(format!(
            "url={}: the engine URL must start with http:// or https://",
            r.url
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_specs_parse_and_errors_explain() {
        let r = replica("url=http://127.0.0.1:8000/,model=smollm2-135m,engine-model=smollm2,window=8").unwrap();
        assert_eq!(
            (r.url.as_str(), r.engine_model.as_deref(), r.window),
            ("http://127.0.0.1:8000", Some("smollm2"), Some(8))
        );
        assert!(replica("model=x").unwrap_err().contains("needs url= and model="));
        assert!(
            replica("url=http://x,model=m,speed=9")
                .unwrap_err()
                .contains("unknown key 'speed'")
        );
        assert!(
            replica("url=http://x,model=m,window=lots")
                .unwrap_err()
                .contains("expected a whole number")
        );
        assert!(
            replica("url=127.0.0.1:8000,model=m")
                .unwrap_err()
                .contains("must start with http://")
        );
    }

    #[test]
    fn durations_and_pairs() {
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(duration("soon").unwrap_err().contains("write e.g. 24h"));
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(key_value("=x").is_err());
    }
}
