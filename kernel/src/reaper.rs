//! The keep-alive reaper: unloads idle models whose keep-alive ran out, sleeping until the next expiry
//! or a change of the table. It holds the table weakly, and ends when the table goes.

use std::sync::{Arc, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::table::Table;

pub(crate) async fn reap(table: Weak<Table>, changed: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(next) = table.upgrade().map(|table| table.expire(Instant::now())) else { return };
        match next {
            Some(next) => {
                let _ = tokio::time::timeout_at(next, notified).await;
            }
            None => notified.await,
        }
    }
}
