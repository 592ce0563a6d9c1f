//! Live fan-out: one broadcast channel per conversation that has subscribers, holding the last
//! `hub.tail_buffer` events, and the subscriber's stream that joins the stored backlog to it.
//!
//! A subscriber first sends the stored events after its `since_seq` (page by page), then joins the
//! conversation's channel, reads the store once more for what was appended in between, and from
//! then on sends the live events. Every event is checked against the last seq sent: one already
//! sent is skipped, and when one arrives ahead of the next expected seq (two appends can reach the
//! channel in the other order than their seqs) the missing ones are read from the store first. So
//! the stream is 1, 2, 3 … with no gap and no repeat across the switch from backlog to live.
//! A subscriber that falls more than the channel holds behind is ended with
//! [`HubError::SubscriberLagged`]; the others are not affected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use super::{BACKLOG_PAGE, EventStream, Hub, HubError};
use crate::state::{HubStore, StoredEvent};

/// The live channels, by conversation id.
#[derive(Debug)]
pub(crate) struct Live {
    capacity: usize,
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<StoredEvent>>>>,
}

impl Live {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            channels: Mutex::default(),
        }
    }

    fn subscribe(&self, conv_id: &str) -> broadcast::Receiver<Arc<StoredEvent>> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels
            .entry(conv_id.to_string())
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe()
    }

    /// Sends a stored event to its conversation's subscribers, if it has any.
    pub(crate) fn publish(&self, event: &StoredEvent) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = channels.get(&event.conv_id)
            && tx.send(Arc::new(event.clone())).is_err()
        {
            // Nobody listens any more.
            channels.remove(&event.conv_id);
        }
    }

    /// Drops the channel of `conv_id` when its last subscriber has gone.
    fn release(&self, conv_id: &str) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if channels
            .get(conv_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            channels.remove(conv_id);
        }
    }

    /// Conversations with a live channel.
    #[cfg(test)]
    pub(crate) fn channels(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Counts a subscriber while it lives; on drop lets its conversation's channel go when unused.
struct Subscriber {
    hub: Arc<Hub>,
    conv_id: String,
}

impl Subscriber {
    fn new(hub: Arc<Hub>, conv_id: String) -> Self {
        if let Some(m) = &hub.metrics {
            m.subscribers.inc();
        }
        Self { hub, conv_id }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(m) = &self.hub.metrics {
            m.subscribers.dec();
        }
        self.hub.live.release(&self.conv_id);
    }
}

/// The subscriber's stream; see the module docs.
pub(super) fn follow(
    hub: Arc<Hub>,
    store: Arc<dyn HubStore>,
    conv_id: String,
    since_seq: i64,
) -> EventStream {
    let subscriber = Subscriber::new(hub.clone(), conv_id.clone());
    Box::pin(async_stream::try_stream! {
        let subscriber = subscriber;
        let mut last = since_seq;
        // The backlog, before joining the channel: a long one cannot make the subscriber lag.
        loop {
            let page = store.read(&conv_id, last, BACKLOG_PAGE).await?;
            let full = page.len() == BACKLOG_PAGE;
            for e in page {
                last = e.seq;
                yield e;
            }
            if !full {
                break;
            }
        }
        let mut rx = hub.live.subscribe(&conv_id);
        // What was appended between the last page and joining.
        loop {
            let page = store.read(&conv_id, last, BACKLOG_PAGE).await?;
            let full = page.len() == BACKLOG_PAGE;
            for e in page {
                last = e.seq;
                yield e;
            }
            if !full {
                break;
            }
        }
        loop {
            let next = tokio::select! {
                biased;
                _ = hub.drain.cancelled() => None,
                r = rx.recv() => Some(r),
            };
            let event = match next {
                None | Some(Err(broadcast::error::RecvError::Closed)) => break,
                Some(Err(broadcast::error::RecvError::Lagged(behind))) => {
                    tracing::debug!(conv_id = %conv_id, behind, "hub subscriber lagged");
                    Err::<(), _>(HubError::SubscriberLagged {
                        behind,
                        last_seq: last,
                        tail_buffer: hub.tail_buffer,
                    })?;
                    break;
                }
                Some(Ok(e)) => e,
            };
            if event.seq <= last {
                continue;
            }
            if event.seq > last + 1 {
                let missing = usize::try_from(event.seq - last - 1).unwrap_or(usize::MAX);
                for e in store.read(&conv_id, last, missing).await? {
                    if e.seq < event.seq {
                        yield e;
                    }
                }
            }
            last = event.seq;
            yield StoredEvent::clone(&event);
        }
        drop(rx);
        drop(subscriber);
    })
}
