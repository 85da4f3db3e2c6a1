//! nginx's stream `allow`/`deny` and `limit_conn`, per listener.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::config::AccessRule;

/// nginx order: the first rule naming the client decides; a client no rule names is
/// allowed.
pub fn allowed(rules: &[AccessRule], ip: IpAddr) -> bool {
    rules.iter().find(|r| r.matches(ip)).is_none_or(|r| r.allow)
}

/// Sessions open per client address on one listener; kept across reloads.
#[derive(Debug, Default)]
pub struct ConnLimits {
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One session's place under its client's limit, given back on drop.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    /// Takes a place for `ip` unless it already has `limit` sessions open.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, limit: u32) -> Option<ConnSlot> {
        let mut open = self.lock();
        let n = open.entry(ip).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            limits: Arc::clone(self),
            ip,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        // Plain counts: a poisoned lock still holds usable data.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(texts: &[&str]) -> Vec<AccessRule> {
        texts
            .iter()
            .map(|t| AccessRule::parse(t).unwrap())
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_match_wins_in_nginx_order() {
        let r = rules(&[
            "deny 10.1.2.3",
            "allow 10.0.0.0/8",
            "allow 2001:db8::/32",
            "deny all",
        ]);
        assert!(!allowed(&r, ip("10.1.2.3")));
        assert!(allowed(&r, ip("10.9.9.9")));
        assert!(allowed(&r, ip("2001:db8::1")));
        assert!(!allowed(&r, ip("2001:db9::1")));
        assert!(!allowed(&r, ip("192.0.2.1")));
        // An IPv4 client on a dual-stack listener arrives IPv4-mapped.
        assert!(allowed(&r, ip("::ffff:10.9.9.9")));
        // A later, narrower rule never beats an earlier, wider one.
        let r = rules(&["deny 10.0.0.0/8", "allow 10.1.0.0/16"]);
        assert!(!allowed(&r, ip("10.1.1.1")));
        assert!(allowed(&[], ip("192.0.2.1")), "no rule: allowed");
    }

    #[test]
    fn bad_rules_are_named() {
        for bad in [
            "permit all",
            "allow",
            "deny 10.0.0.0/33",
            "allow 1.2.3.4 5.6.7.8",
        ] {
            assert!(AccessRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limit_per_address_and_release_on_drop() {
        let limits = Arc::new(ConnLimits::default());
        let a = ip("192.0.2.1");
        let first = limits.try_acquire(a, 2).unwrap();
        let _second = limits.try_acquire(a, 2).unwrap();
        assert!(limits.try_acquire(a, 2).is_none());
        assert!(limits.try_acquire(ip("192.0.2.2"), 2).is_some());
        drop(first);
        assert!(limits.try_acquire(a, 2).is_some());
        drop(_second);
        assert_eq!(
            limits.lock().len(),
            0,
            "no entry left for addresses with nothing open"
        );
    }
}
