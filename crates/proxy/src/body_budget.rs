//! The memory budget for request bodies: how many bytes of them Tether holds at once, over
//! all requests and per tenant (`request_bodies.memory_mib`, `request_bodies.tenant_share`).
//!
//! A body read ahead reserves its bytes before it is read, through a [`BodyReservation`] that
//! the request keeps while it holds the body and that gives them back when it drops, however
//! the request ends (an error, a client that left), so nothing stays reserved after its
//! request. A reservation that would go over either limit is refused and the caller lets the
//! body stream on instead of holding it.
//!
//! Pure bookkeeping on atomics: no Pingora, no lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tether_topology::RequestBodySettings;

use crate::limits::TenantUsage;

/// The bytes of request bodies held now, over all requests. One per process, kept across
/// reloads (a new limit applies to the next reservation).
#[derive(Debug, Default)]
pub struct BodyBudget {
    held: AtomicUsize,
}

impl BodyBudget {
    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Which limit refused a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverBudget {
    /// Every tenant's bodies together (`request_bodies.memory_mib`).
    Total,
    /// The tenant's share (`request_bodies.tenant_share`).
    Tenant,
}

impl OverBudget {
    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            OverBudget::Total => "total",
            OverBudget::Tenant => "tenant",
        }
    }
}

/// Adds `bytes` to `counter` unless that takes it over `limit`.
fn try_add(counter: &AtomicUsize, bytes: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            held.checked_add(bytes).filter(|after| *after <= limit)
        })
        .is_ok()
}

/// The bytes one request's body holds, counted in the process's [`BodyBudget`] and in its
/// tenant's share until released or dropped.
#[derive(Debug)]
pub struct BodyReservation {
    budget: Arc<BodyBudget>,
    tenant: Arc<TenantUsage>,
    held: usize,
}

impl BodyReservation {
    /// An empty reservation for a request of `tenant`.
    pub fn new(budget: Arc<BodyBudget>, tenant: Arc<TenantUsage>) -> Self {
        BodyReservation {
            budget,
            tenant,
            held: 0,
        }
    }

    /// Reserves `bytes` more under `limits`; on refusal nothing changes.
    pub fn grow(&mut self, bytes: usize, limits: &RequestBodySettings) -> Result<(), OverBudget> {
        if !try_add(&self.budget.held, bytes, limits.memory_limit) {
            return Err(OverBudget::Total);
        }
        if !try_add(self.tenant.body_bytes(), bytes, limits.tenant_limit) {
            self.budget.held.fetch_sub(bytes, Ordering::Relaxed);
            return Err(OverBudget::Tenant);
        }
        self.held += bytes;
        Ok(())
    }

    /// Gives back what is reserved beyond `bytes` (a body read ahead turned out smaller
    /// than reserved for).
    pub fn shrink_to(&mut self, bytes: usize) {
        let excess = self.held.saturating_sub(bytes);
        if excess > 0 {
            self.held -= excess;
            self.budget.held.fetch_sub(excess, Ordering::Relaxed);
            self.tenant
                .body_bytes()
                .fetch_sub(excess, Ordering::Relaxed);
        }
    }

    /// Gives back everything reserved (the body was sent on or dropped).
    pub fn release(&mut self) {
        let held = std::mem::take(&mut self.held);
        if held > 0 {
            self.budget.held.fetch_sub(held, Ordering::Relaxed);
            self.tenant.body_bytes().fetch_sub(held, Ordering::Relaxed);
        }
    }

    /// Bytes reserved now.
    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(memory_limit: usize, tenant_limit: usize) -> RequestBodySettings {
        RequestBodySettings {
            memory_limit,
            tenant_limit,
            deadline: Duration::from_secs(60),
        }
    }

    #[test]
    fn reserves_up_to_the_total_and_releases_everything() {
        let budget = Arc::new(BodyBudget::default());
        let tenant = Arc::new(TenantUsage::default());
        let limits = limits(100, 100);
        let mut a = BodyReservation::new(Arc::clone(&budget), Arc::clone(&tenant));
        assert_eq!(a.grow(60, &limits), Ok(()));
        assert_eq!(a.grow(40, &limits), Ok(()));
        assert_eq!(a.grow(1, &limits), Err(OverBudget::Total));
        assert_eq!((a.held(), budget.held()), (100, 100));
        a.release();
        assert_eq!((a.held(), budget.held()), (0, 0));
        assert_eq!(tenant.body_bytes().load(Ordering::Relaxed), 0);
        assert_eq!(
            a.grow(100, &limits),
            Ok(()),
            "released bytes are free again"
        );
    }

    #[test]
    fn shrinking_gives_back_only_the_excess() {
        let budget = Arc::new(BodyBudget::default());
        let tenant = Arc::new(TenantUsage::default());
        let mut a = BodyReservation::new(Arc::clone(&budget), Arc::clone(&tenant));
        assert_eq!(a.grow(80, &limits(100, 100)), Ok(()));
        a.shrink_to(30);
        assert_eq!((a.held(), budget.held()), (30, 30));
        assert_eq!(tenant.body_bytes().load(Ordering::Relaxed), 30);
        a.shrink_to(50);
        assert_eq!(a.held(), 30, "shrinking never grows");
        drop(a);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn one_tenant_holds_at_most_its_share_and_others_keep_the_rest() {
        let budget = Arc::new(BodyBudget::default());
        let (loud, quiet) = (Arc::new(TenantUsage::default()), Arc::default());
        let limits = limits(100, 50);
        let mut first = BodyReservation::new(Arc::clone(&budget), Arc::clone(&loud));
        let mut second = BodyReservation::new(Arc::clone(&budget), Arc::clone(&loud));
        assert_eq!(first.grow(30, &limits), Ok(()));
        assert_eq!(second.grow(30, &limits), Err(OverBudget::Tenant));
        assert_eq!(second.grow(20, &limits), Ok(()));
        // The refused reservation left the total as it was.
        assert_eq!(budget.held(), 50);
        let mut other = BodyReservation::new(Arc::clone(&budget), quiet);
        assert_eq!(other.grow(50, &limits), Ok(()));
        assert_eq!(other.grow(1, &limits), Err(OverBudget::Total));
    }

    #[test]
    fn a_dropped_reservation_gives_its_bytes_back() {
        let budget = Arc::new(BodyBudget::default());
        let tenant = Arc::new(TenantUsage::default());
        let limits = limits(100, 100);
        let failing = || -> Result<(), OverBudget> {
            let mut r = BodyReservation::new(Arc::clone(&budget), Arc::clone(&tenant));
            r.grow(70, &limits)?;
            // An error after buffering (the client left, the body broke off): `r` drops.
            r.grow(70, &limits)
        };
        assert_eq!(failing(), Err(OverBudget::Total));
        assert_eq!(budget.held(), 0);
        assert_eq!(tenant.body_bytes().load(Ordering::Relaxed), 0);
    }
}
