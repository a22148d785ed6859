//! Admission: at most N generations run at once; others wait in a bounded queue, the most urgent and
//! then the oldest first; a full queue refuses at once. A finishing generation hands its slot straight
//! to the next in line, under the lock, so that no newcomer overtakes the queue.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::error::ExecutorError;
use crate::metrics::ExecutorMetrics;
use crate::request::Priority;

/// The queue's order: most urgent first, then first come.
type Key = (Reverse<Priority>, u64);

pub(crate) struct Admission {
    state: Mutex<State>,
    limit: usize,
    capacity: usize,
    metrics: Arc<ExecutorMetrics>,
}

#[derive(Default)]
struct State {
    running: usize,
    queue: BTreeMap<Key, oneshot::Sender<()>>,
    next: u64,
}

/// A generation slot; dropping it hands the slot on.
pub(crate) struct Slot {
    admission: Arc<Admission>,
}

/// A place in line: a slot now, or a wait for one.
pub(crate) enum Ticket {
    Now(Slot),
    Queued(Place),
}

/// A place in the queue; dropping it leaves the queue (and passes on a slot that came meanwhile).
pub(crate) struct Place {
    admission: Arc<Admission>,
    key: Key,
    granted: Option<oneshot::Receiver<()>>,
}

impl Admission {
    pub(crate) fn new(limit: usize, capacity: usize, metrics: Arc<ExecutorMetrics>) -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), limit, capacity, metrics })
    }

    /// Tickets for `priorities`, all or none: a batch the queue cannot take whole is refused whole.
    pub(crate) fn admit(self: &Arc<Self>, priorities: &[Priority]) -> Result<Vec<Ticket>, ExecutorError> {
        let mut st = self.state.lock();
        let free = self.limit.saturating_sub(st.running);
        let waiting = priorities.len().saturating_sub(free);
        // A newcomer never takes a free slot while others wait for one (there are none then: a freed slot
        // goes straight to the queue's head), so free slots and an empty queue go together.
        if waiting > self.capacity - st.queue.len() {
            return Err(ExecutorError::QueueFull {
                running: st.running,
                queued: st.queue.len(),
                capacity: self.capacity,
                refused: priorities.len(),
            });
        }
        // Free slots go to the batch's most urgent requests first; the rest queue in their order.
        let mut order: Vec<usize> = (0..priorities.len()).collect();
        order.sort_by_key(|&index| Reverse(priorities[index]));
        let mut tickets: Vec<Option<Ticket>> = (0..priorities.len()).map(|_| None).collect();
        for index in order {
            tickets[index] = Some(if st.running < self.limit {
                st.running += 1;
                Ticket::Now(Slot { admission: Arc::clone(self) })
            } else {
                let key = (Reverse(priorities[index]), st.next + index as u64);
                let (grant, granted) = oneshot::channel();
                st.queue.insert(key, grant);
                Ticket::Queued(Place { admission: Arc::clone(self), key, granted: Some(granted) })
            });
        }
        st.next += priorities.len() as u64;
        self.publish(&st);
        Ok(tickets.into_iter().map(|ticket| ticket.expect("every index is in the order")).collect())
    }

    /// Running generations and queued requests.
    pub(crate) fn load(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.running, st.queue.len())
    }

    /// A slot came free: the head of the queue takes it, or it is returned.
    fn release(&self) {
        let mut st = self.state.lock();
        Self::hand_on(&mut st);
        self.publish(&st);
    }

    fn hand_on(st: &mut State) {
        while let Some((_, grant)) = st.queue.pop_first() {
            if grant.send(()).is_ok() {
                return; // the slot changes hands: `running` stays
            }
        }
        st.running -= 1;
    }

    fn publish(&self, st: &State) {
        self.metrics.set_load(st.running, st.queue.len());
    }
}

impl Place {
    /// Waits for a slot. Cancel-safe: dropping the future leaves the queue.
    pub(crate) async fn wait(mut self) -> Slot {
        let granted = self.granted.as_mut().expect("a place is waited on once");
        granted.await.expect("a queued sender stays in the queue until it grants, and we hold the receiver");
        self.granted = None;
        Slot { admission: Arc::clone(&self.admission) }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(mut granted) = self.granted.take() else { return };
        let admission = &self.admission;
        let mut st = admission.state.lock();
        if st.queue.remove(&self.key).is_none() && granted.try_recv().is_ok() {
            // Granted after our last look: the slot is ours to pass on.
            Admission::hand_on(&mut st);
        }
        admission.publish(&st);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release();
    }
}
