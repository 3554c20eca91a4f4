//! Who may open a WebSocket: connections per process, per client IP and per
//! user (`sub`), and the `Origin` allow-list for browser handshakes.
//!
//! A handshake that passes gets a [`Slot`], which the connection holds until
//! it ends; dropping it gives its counts back, however the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::StatusCode;

use fanout_core::Limits;

/// Why a handshake was refused; the message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many connections on this node")]
    Node,
    #[error("too many connections from this address (at most {0})")]
    Ip(usize),
    #[error("too many connections for this user (at most {0})")]
    Sub(usize),
    #[error("origin {0:?} is not allowed")]
    Origin(String),
}

impl Refusal {
    /// The `reason` label of `fanout_handshake_rejections_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Node => "too_many",
            Refusal::Ip(_) => "too_many_per_ip",
            Refusal::Sub(_) => "too_many_per_sub",
            Refusal::Origin(_) => "origin",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Origin(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// The counts behind the limits. See the module docs.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    max_per_sub: usize,
    origins: Vec<String>,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    per_sub: Mutex<HashMap<String, usize>>,
}

/// One admitted connection's share of the counts.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
    sub: Option<String>,
}

impl Admission {
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_total: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            max_per_sub: limits.max_connections_per_sub,
            origins: limits.allowed_origins.clone(),
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            per_sub: Mutex::new(HashMap::new()),
        }
    }

    /// Open connections.
    pub fn count(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// A browser's `Origin` must be on the list, when there is one; clients
    /// that send none (servers, apps) are not browsers and pass.
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), Refusal> {
        match origin {
            Some(o) if !self.origins.is_empty() && !self.origins.iter().any(|a| a == "*" || a == o) => {
                Err(Refusal::Origin(o.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// Takes a slot for a connection from `ip` as `sub`, or says which limit
    /// it would cross (0 is no limit). Nothing is taken when refused.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>, sub: Option<&str>) -> Result<Slot, Refusal> {
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            })
            .map_err(|_| Refusal::Node)?;
        // From here on the slot gives back whatever it holds when dropped.
        let mut slot = Slot {
            admission: self.clone(),
            ip: None,
            sub: None,
        };
        if let Some(ip) = ip.filter(|_| self.max_per_ip > 0) {
            take(&self.per_ip, ip, self.max_per_ip).map_err(|_| Refusal::Ip(self.max_per_ip))?;
            slot.ip = Some(ip);
        }
        if let Some(sub) = sub.filter(|_| self.max_per_sub > 0) {
            take(&self.per_sub, sub.to_owned(), self.max_per_sub).map_err(|_| Refusal::Sub(self.max_per_sub))?;
            slot.sub = Some(sub.to_owned());
        }
        Ok(slot)
    }
}

fn take<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: K, max: usize) -> Result<(), ()> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    let n = map.entry(key).or_insert(0);
    if *n >= max {
        // A new entry at 0 would stay behind; `max` is at least 1, so the
        // entry is not new here.
        return Err(());
    }
    *n += 1;
    Ok(())
}

fn give<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: &K) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let a = &self.admission;
        if let Some(ip) = &self.ip {
            give(&a.per_ip, ip);
        }
        if let Some(sub) = &self.sub {
            give(&a.per_sub, sub);
        }
        a.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(per_ip: usize, per_sub: usize, origins: &[&str]) -> Arc<Admission> {
        Arc::new(Admission::new(&Limits {
            max_connections: 5,
            max_connections_per_ip: per_ip,
            max_connections_per_sub: per_sub,
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            ..Limits::default()
        }))
    }

    #[test]
    fn each_limit_refuses_and_a_closed_connection_gives_its_share_back() {
        let a = admission(2, 1, &[]);
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = a.admit(Some(ip1), Some("ann")).unwrap();
        let s2 = a.admit(Some(ip1), None).unwrap();
        assert_eq!(a.admit(Some(ip1), None).unwrap_err(), Refusal::Ip(2));
        assert_eq!(a.admit(Some(ip2), Some("ann")).unwrap_err(), Refusal::Sub(1));
        assert_eq!(a.count(), 2, "refusals take nothing");
        drop(s1);
        let _s3 = a.admit(Some(ip2), Some("ann")).unwrap();
        let _s4 = a.admit(Some(ip1), Some("bob")).unwrap();
        let _s5 = a.admit(None, None).unwrap();
        let _s6 = a.admit(None, None).unwrap();
        assert_eq!(a.admit(None, None).unwrap_err(), Refusal::Node);
        drop(s2);
        assert_eq!(a.count(), 4);
        assert!(a.per_ip.lock().unwrap().get(&ip1) == Some(&1));
    }

    #[test]
    fn origins() {
        let open = admission(0, 0, &[]);
        assert!(open.check_origin(Some("https://evil.example")).is_ok());
        let listed = admission(0, 0, &["https://app.example"]);
        assert!(listed.check_origin(Some("https://app.example")).is_ok());
        assert!(listed.check_origin(None).is_ok(), "no Origin: not a browser");
        let refused = listed.check_origin(Some("https://evil.example")).unwrap_err();
        assert_eq!((refused.label(), refused.status()), ("origin", StatusCode::FORBIDDEN));
    }
}
