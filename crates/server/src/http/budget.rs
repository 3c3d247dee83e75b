//! One budget of webhook-body bytes shared by every request, so what
//! strangers can make the service hold before it knows who they are is
//! bounded however many of them there are.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone, Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
}

/// Bytes taken from the budget; given back when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Grows `held` by `more` bytes, or fails at once (never waits: a full
    /// budget is answered 503, not queued).
    pub fn grow(&self, held: &mut Reservation, more: usize) -> bool {
        if more == 0 {
            return true;
        }
        let Ok(n) = u32::try_from(more) else {
            return false;
        };
        match Arc::clone(&self.bytes).try_acquire_many_owned(n) {
            Ok(permit) => {
                match &mut held.permit {
                    Some(p) => p.merge(permit),
                    None => held.permit = Some(permit),
                }
                true
            }
            Err(_) => false,
        }
    }
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_shared_and_given_back() {
        let budget = BodyBudget::new(100);
        let mut a = Reservation::default();
        assert!(budget.grow(&mut a, 60));
        assert!(budget.grow(&mut a, 30));
        assert_eq!(a.bytes(), 90);
        let mut b = Reservation::default();
        assert!(!budget.grow(&mut b, 20), "only 10 left");
        assert!(budget.grow(&mut b, 10));
        drop(a);
        assert_eq!(budget.available(), 90);
        assert!(budget.grow(&mut b, 90));
        assert_eq!(budget.available(), 0);
    }
}
