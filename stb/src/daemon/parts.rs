//! The parts the daemon acts through, shared by the flow executor ([`super::exec`]) and
//! recovery ([`super::recover`]): the journal, the card, the gateway, and the event loop's
//! channel that gateway answers come back on.

use std::sync::Arc;

use proto::messages::Message;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::card::CardPort;
use super::event::Event;
use super::gateway::{Gateway, GatewayError};
use super::prefetch::Prefetch;
use crate::journal::Journal;

pub struct Parts {
    /// Every transaction step, written before the action it announces.
    pub journal: Journal,
    /// The reader and the open card session.
    pub card: CardPort,
    /// The QUIC connection to the head end.
    pub gateway: Arc<Gateway>,
    /// The event loop's channel (gateway answers come back on it).
    pub events: mpsc::Sender<Event>,
    /// The offer asked for ahead of OK, which the purchase flow's request may meet.
    pub prefetch: Prefetch,
}

impl Parts {
    /// Sends `msg` to the gateway as a task, in `span`; its answer (or the gateway's error,
    /// typed: the flows' boundary maps it to a [`stb_flow::NetworkFailure`]) comes back to
    /// the event loop as `answer(result)`, so the loop keeps running meanwhile.
    pub fn call(
        &self,
        msg: Message,
        span: tracing::Span,
        answer: impl FnOnce(Result<Message, GatewayError>) -> Event + Send + 'static,
    ) {
        self.call_after(std::time::Duration::ZERO, msg, span, answer);
    }

    /// [`Parts::call`] after waiting `wait` (a transfer's next ask for a packet that has
    /// not come).
    pub fn call_after(
        &self,
        wait: std::time::Duration,
        msg: Message,
        span: tracing::Span,
        answer: impl FnOnce(Result<Message, GatewayError>) -> Event + Send + 'static,
    ) {
        let gw = self.gateway.clone();
        let tx = self.events.clone();
        tokio::spawn(
            async move {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                let result = gw.call(&msg).await;
                let _ = tx.send(answer(result)).await;
            }
            .instrument(span),
        );
    }
}
