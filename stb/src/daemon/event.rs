//! What the daemon's event loop reacts to ([`Event`]) and the snapshot it publishes
//! ([`Status`]). Everything that runs apart from the loop (gateway calls, the local API,
//! the reader) talks to it through these.

use proto::messages::Message;
use reader_drivers::ReaderEvent;
use stb_flow::purchase::Outcome;
use tokio::sync::oneshot;

use super::gateway::GatewayError;
use ui::{ScreenId, UiEvent};

/// What the loop reacts to.
pub enum Event {
    /// A key from the remote, a resize, a tick.
    Ui(UiEvent),
    /// A reader or card came or went.
    Reader(ReaderEvent),
    /// The answer to a flow's outstanding request (`flow` says which flow asked; ids of the
    /// load slot are apart from the purchase slot's).
    Answer {
        flow: u64,
        result: Result<Message, GatewayError>,
    },
    /// The answer to an offer prefetch ([`super::prefetch`]): `request` is what was sent.
    Prefetched {
        request: Box<Message>,
        result: Result<Message, GatewayError>,
    },
    /// The answer to the catalog request.
    Catalog(Result<Message, GatewayError>),
    /// A local app asks for a payment.
    Pay {
        merchant_id: String,
        item_id: String,
        reply: oneshot::Sender<Outcome>,
    },
    /// The gateway connection came (back) up.
    Connected,
    /// The gateway's answer to a card-to-card transfer's message (`flow` says which
    /// transfer asked).
    Transfer {
        flow: u64,
        result: Result<Message, GatewayError>,
    },
    /// The answer to a recovery message for an in-doubt transaction.
    Recovery {
        transaction_id: String,
        result: Result<Message, GatewayError>,
    },
}

/// A snapshot for tests, the local API and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub screen: ScreenId,
    pub offer: Option<String>,
    pub card_balance: Option<i64>,
    pub last_outcome: Option<Outcome>,
    pub flows_done: u64,
    /// In-doubt transactions (purchases and loads) closed by recovery.
    pub recovered: u64,
    /// Purchases recovery journaled `unresolvable`.
    pub unresolvable: u64,
    /// Recovery messages awaiting the head end's answer.
    pub recovery_calls: usize,
}
