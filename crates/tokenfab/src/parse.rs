//! Parsers for command-line values, with errors that say what is expected.

use std::time::Duration;

/// A duration like `24h`, `90m`, `30s`, `1d 12h`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration ({e}); write e.g. 24h, 90m, 30s or 1d"))
}

/// A value of a policy with named choices (`--routing least-loaded`); `--help` lists
/// the names.
pub fn choice<T: tokenfab_core::policy::Choice + Send + Sync>() -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(T::CHOICES.iter().map(|(name, _)| PossibleValue::new(*name)))
        .try_map(|s: String| T::parse_choice(&s))
}

/// A duration policy's default as `--help` shows it and clap parses it, read from
/// `Policies::default()` (so that the default is written once, in the core). Leaks the
/// text: clap keeps it for the life of the command, built once per run.
pub fn shown(field: fn(&tokenfab_core::policy::Policies) -> Duration) -> &'static str {
    let d = field(&tokenfab_core::policy::Policies::default());
    Box::leak(humantime::format_duration(d).to_string().into_boxed_str())
}

/// A size in bytes: `1048576`, `512KiB`, `16MiB`, `1GiB`, `2TiB` (or KB, MB, GB, TB as
/// powers of 1000).
pub fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(format!(
                "'{s}' is not a size; write e.g. 1048576, 512KiB, 16MiB or 1GiB"
            ));
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size; write e.g. 1048576, 512KiB, 16MiB or 1GiB"))?;
    Ok((n * factor) as u64)
}

/// A secret read from a file: its first line, trimmed. The file should be readable only
/// by the service's user.
pub fn secret_file(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        anyhow::bail!(
            "the {what} file {} is empty; write the secret on its first line",
            path.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Group bits are allowed: Kubernetes mounts secrets for a pod's fsGroup (0440).
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o007 != 0
        {
            tracing::warn!(
                "the {what} file {} can be read by users outside its owner and group (mode {:o}); chmod 600 (or 640) it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    Ok(secret)
}

/// `NAME=TOKEN` of `--tenant`, the token kept out of `Debug` output.
pub fn tenant_token(s: &str) -> Result<(String, tokenfab_identity::Secret), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.into())),
        _ => Err("a tenant is NAME=TOKEN".to_string()),
    }
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
    /// With `--devices nvml`: the node's GPU indices the replica runs on.
    pub gpus: Option<Vec<u32>>,
}

pub const REPLICA_HELP: &str = "url=URL,model=MODEL[,id=ID][,engine-model=NAME][,window=N][,max=N][,gpus=LIST]";

/// GPU indices written as `0-3`, `0:2:5` or `0-1:4-5`.
pub fn gpu_list(v: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for item in v.split(':') {
        let number = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("gpus={v}: '{s}' is not a GPU index; write e.g. gpus=0-3 or gpus=0:2"))
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(format!("gpus={v}: the range {a}-{b} is empty"));
                }
                out.extend(a..=b);
            }
            None => out.push(number(item)?),
        }
    }
    let mut seen = out.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != out.len() {
        return Err(format!("gpus={v}: a GPU is named twice"));
    }
    Ok(out)
}

pub fn replica(s: &str) -> Result<ReplicaArg, String> {
    let mut r = ReplicaArg {
        url: String::new(),
        model: String::new(),
        id: None,
        engine_model: None,
        window: None,
        max_concurrency: None,
        gpus: None,
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
            "gpus" => r.gpus = Some(gpu_list(v)?),
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
    fn gpu_lists() {
        assert_eq!(gpu_list("0-3"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(gpu_list("0:2:5"), Ok(vec![0, 2, 5]));
        assert_eq!(gpu_list("4-5:0"), Ok(vec![4, 5, 0]));
        assert!(gpu_list("0-1:1").unwrap_err().contains("named twice"));
        assert!(gpu_list("3-1").unwrap_err().contains("empty"));
        assert!(gpu_list("a").unwrap_err().contains("not a GPU index"));
        let r = replica("url=http://x,model=m,gpus=0-1").unwrap();
        assert_eq!(r.gpus, Some(vec![0, 1]));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes("1048576"), Ok(1 << 20));
        assert_eq!(bytes("16MiB"), Ok(16 << 20));
        assert_eq!(bytes("1.5 GiB"), Ok(3 << 29));
        assert_eq!(bytes("2GB"), Ok(2_000_000_000));
        assert!(bytes("lots").unwrap_err().contains("write e.g. 1048576"));
        assert!(bytes("3 parsecs").is_err());
    }

    #[test]
    fn durations_and_pairs() {
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(duration("soon").unwrap_err().contains("write e.g. 24h"));
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(key_value("=x").is_err());
    }
}
