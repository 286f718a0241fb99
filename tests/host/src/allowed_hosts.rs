//! `allowed_outbound_hosts` as Spin reads it: `scheme://host[:port]` where scheme, host and port
//! may be `*`, the host may be `*.domain` or a CIDR block, the port a range `a..b`, and a missing
//! port means the scheme's well-known port (postgres: 5432). Spin refuses to start on an entry it
//! cannot parse, and so does this host.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, PartialEq)]
enum HostPattern {
    Any,
    /// `*.example.com` matches any subdomain of example.com.
    Subdomain(String),
    Cidr(IpAddr, u8),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq)]
enum PortPattern {
    Any,
    /// Half-open range, as Rust's `a..b`.
    Range(u16, u16),
    Exact(u16),
}

#[derive(Debug, Clone, PartialEq)]
struct AllowedHost {
    scheme: Option<String>,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    entries: Vec<AllowedHost>,
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "postgres" => Some(5432),
        "mysql" => Some(3306),
        "redis" => Some(6379),
        "mqtt" => Some(1883),
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl AllowedHosts {
    /// Parse already-expanded entries.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self> {
        let entries = entries
            .iter()
            .map(|e| {
                parse_entry(e.as_ref()).with_context(|| {
                    format!("invalid allowed_outbound_hosts entry {:?}", e.as_ref())
                })
            })
            .collect::<Result<_>>()?;
        Ok(AllowedHosts { entries })
    }

    /// Whether `scheme://host:port` may be reached.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.entries.iter().any(|e| {
            e.scheme.as_deref().is_none_or(|s| s == scheme)
                && host_matches(&e.host, host)
                && match e.port {
                    PortPattern::Any => true,
                    PortPattern::Exact(p) => p == port,
                    PortPattern::Range(lo, hi) => (lo..hi).contains(&port),
                }
        })
    }
}

impl AllowedHosts {
    /// Whether requests to the application itself may be made (Spin's `allows_relative_url`):
    /// an entry for the host `self` or `self.alt` (e.g. `http://self`), or one for any host,
    /// with the scheme http, https or `*`.
    pub fn allows_self(&self) -> bool {
        self.entries.iter().any(|e| {
            e.scheme
                .as_deref()
                .is_none_or(|s| s == "http" || s == "https")
                && match &e.host {
                    HostPattern::Any => true,
                    HostPattern::Exact(h) => h == "self" || h == "self.alt",
                    _ => false,
                }
        })
    }
}

fn host_matches(pattern: &HostPattern, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match pattern {
        HostPattern::Any => true,
        HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
        HostPattern::Subdomain(domain) => {
            let host = host.to_ascii_lowercase();
            host.len() > domain.len() + 1
                && host.ends_with(domain.as_str())
                && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
        }
        HostPattern::Cidr(net, prefix) => match host.parse::<IpAddr>() {
            Ok(ip) => in_cidr(ip, *net, *prefix),
            Err(_) => false,
        },
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

fn parse_entry(entry: &str) -> Result<AllowedHost> {
    let (scheme, rest) = entry
        .split_once("://")
        .context("an entry must start with a scheme, e.g. postgres://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') {
        bail!("an entry may not contain a path or query");
    }
    let scheme = (scheme != "*").then(|| scheme.to_string());

    // Split host and port, minding IPv6 literals (`[::1]:5432`) and CIDR blocks (`10.0.0.0/8`
    // cannot appear here as '/' is rejected above, so CIDR is written without a port only when
    // the scheme has a well-known one).
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').context("unterminated '['")?;
        (h, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        bail!("missing host");
    }
    let host = if host == "*" {
        HostPattern::Any
    } else if let Some(domain) = host.strip_prefix("*.") {
        HostPattern::Subdomain(domain.to_ascii_lowercase())
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        HostPattern::Cidr(ip, if ip.is_ipv4() { 32 } else { 128 })
    } else {
        HostPattern::Exact(host.to_ascii_lowercase())
    };
    let port = match port {
        Some("*") => PortPattern::Any,
        Some(p) => match p.split_once("..") {
            Some((lo, hi)) => PortPattern::Range(
                lo.parse().context("bad port range")?,
                hi.parse().context("bad port range")?,
            ),
            None => PortPattern::Exact(p.parse().context("bad port")?),
        },
        None => match scheme.as_deref().and_then(well_known_port) {
            Some(p) => PortPattern::Exact(p),
            None => bail!("no port given and the scheme has no well-known port"),
        },
    };
    Ok(AllowedHost { scheme, host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_entries() {
        let a =
            AllowedHosts::parse(&["postgres://127.0.0.1:55432", "postgres://db.internal"]).unwrap();
        assert!(a.allows("postgres", "127.0.0.1", 55432));
        assert!(!a.allows("postgres", "127.0.0.1", 5432));
        assert!(a.allows("postgres", "db.internal", 5432));
        assert!(!a.allows("postgres", "db.internal", 5433));
        assert!(!a.allows("mysql", "db.internal", 5432));
        assert!(!a.allows("postgres", "localhost", 55432));
    }

    #[test]
    fn wildcards() {
        let a = AllowedHosts::parse(&["postgres://*:*"]).unwrap();
        assert!(a.allows("postgres", "anything", 1));
        let a = AllowedHosts::parse(&["*://*.example.com:5000..5010"]).unwrap();
        assert!(a.allows("postgres", "db.example.com", 5005));
        assert!(!a.allows("postgres", "example.com", 5005));
        assert!(!a.allows("postgres", "db.example.com", 5010));
        assert!(AllowedHosts::parse(&["127.0.0.1:5432"]).is_err());
        assert!(AllowedHosts::parse(&["*://host"]).is_err());
    }

    #[test]
    fn self_requests_need_http_self() {
        assert!(AllowedHosts::parse(&["http://self"]).unwrap().allows_self());
        assert!(AllowedHosts::parse(&["https://self"])
            .unwrap()
            .allows_self());
        assert!(AllowedHosts::parse(&["*://*:*"]).unwrap().allows_self());
        assert!(!AllowedHosts::parse(&["postgres://self"])
            .unwrap()
            .allows_self());
        assert!(
            !AllowedHosts::parse(&["postgres://127.0.0.1:5432", "https://load.invalid"])
                .unwrap()
                .allows_self()
        );
    }
}
