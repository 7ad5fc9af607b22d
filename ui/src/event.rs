//! The UI's whole interface with the daemon: what goes in (`UiEvent`) and what comes out
//! (`Intent`).
//!
//! This file owns those types and `Pin`, the one secret that crosses the boundary. The daemon
//! feeds one queue of `UiEvent`s into [`crate::App::handle`] and acts on the returned intents.

use crate::keymap::RemoteKey;
use crate::model::*;
use crate::money::Money;
use std::fmt;

/// Everything that can happen to the UI, in one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UiEvent {
    /// A remote-control key, already mapped by [`crate::keymap::Keymap`].
    Key(RemoteKey),
    /// The daemon's model changed.
    Update(UiUpdate),
    /// One second passed. The only clock the UI knows: countdowns and spinners advance on it,
    /// so tests drive time by sending ticks. See [`crate::App::wants_ticks`].
    Tick,
    /// The terminal was resized; nothing changes but the next draw.
    Resize,
}

/// A model update from the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UiUpdate {
    CardInserted(CardSummary),
    CardRemoved,
    Reader(ReaderState),
    CatalogLoaded(Catalog),
    /// An offer to confirm; shown as a popup over the current screen.
    Offer(Offer),
    /// The daemon withdrew an offer (e.g. the merchant cancelled); closes the popup if it is
    /// this one. No intent is emitted.
    OfferWithdrawn(TxId),
    Progress(ProgressStep),
    Receipt(Receipt),
    History(Vec<HistoryEntry>),
    Error(UiError),
    /// The largest load allowed now (from bank/load server and the card's max balance);
    /// opens the amount entry.
    LoadMax(Money),
    PinRequest(PinRequest),
    /// The daemon settled transactions that were in doubt (recovery): a "Being settled"
    /// screen still showing closes, with a note to look in History.
    Settled,
    /// The card took the privacy switch (seed 004): privacy is now on (`true`) or off.
    PrivacyChanged(bool),
    /// Receiving from another card: the most the card can take now (its maximum balance
    /// less its balance); opens the amount entry.
    ReceiveMax(Money),
    /// Receiving: the code the receiver tells the sender (8 digits) and the amount asked;
    /// shown until the sender's card answers.
    TransferCode {
        code: String,
        amount: Money,
    },
    /// Sending: the transfer the code named, for the viewer to confirm.
    TransferTerms(TransferTerms),
    /// The transfer the viewer cancelled ended with nothing moved: a transfer screen still
    /// showing (its progress) goes home, with a notice.
    TransferCancelled,
}

impl UiUpdate {
    /// The update with every string made terminal-safe and capped ([`crate::text::clean`]):
    /// titles, names, details, references and reasons come from the network, the card or
    /// the reader. Ids the daemon gets back in an [`Intent`] (a catalog id, an offer's
    /// transaction id) are kept as they are; they are never drawn.
    pub fn sanitized(self) -> Self {
        use crate::text::{
            self, MAX_DETAIL, MAX_NAME, MAX_PROVIDER, MAX_REASON, MAX_REF, MAX_TITLE,
        };
        let item = |i: CatalogItem| CatalogItem {
            title: text::clean(&i.title, MAX_TITLE),
            detail: text::clean(&i.detail, MAX_DETAIL),
            ..i
        };
        match self {
            UiUpdate::CardInserted(c) => UiUpdate::CardInserted(CardSummary {
                provider: text::clean(&c.provider, MAX_PROVIDER),
                ..c
            }),
            UiUpdate::Reader(ReaderState::Ready { name }) => UiUpdate::Reader(ReaderState::Ready {
                name: text::clean(&name, MAX_REF),
            }),
            UiUpdate::CatalogLoaded(c) => UiUpdate::CatalogLoaded(Catalog {
                pay_per_view: c.pay_per_view.into_iter().map(item).collect(),
                shopping: c.shopping.into_iter().map(item).collect(),
            }),
            UiUpdate::Offer(o) => UiUpdate::Offer(Offer {
                item: text::clean(&o.item, MAX_TITLE),
                merchant: text::clean(&o.merchant, MAX_NAME),
                ..o
            }),
            UiUpdate::Receipt(r) => UiUpdate::Receipt(Receipt {
                txid: TxId(text::clean(&r.txid.0, MAX_REF)),
                item: text::clean(&r.item, MAX_TITLE),
                merchant: text::clean(&r.merchant, MAX_NAME),
                ..r
            }),
            UiUpdate::Error(e) => UiUpdate::Error(UiError {
                detail: e.detail.map(|d| text::clean(&d, MAX_REASON)),
                ..e
            }),
            other @ (UiUpdate::Reader(_)
            | UiUpdate::CardRemoved
            | UiUpdate::OfferWithdrawn(_)
            | UiUpdate::Progress(_)
            | UiUpdate::History(_)
            | UiUpdate::LoadMax(_)
            | UiUpdate::PinRequest(_)
            | UiUpdate::Settled
            | UiUpdate::PrivacyChanged(_)
            | UiUpdate::ReceiveMax(_)
            | UiUpdate::TransferCode { .. }
            | UiUpdate::TransferCancelled) => other,
            UiUpdate::TransferTerms(t) => UiUpdate::TransferTerms(TransferTerms {
                to_card: text::clean(&t.to_card, MAX_REF),
                ..t
            }),
        }
    }
}

/// Why an offer was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The viewer pressed BACK.
    Viewer,
    /// The countdown ran out.
    Timeout,
    /// A newer offer arrived while this one was still open.
    Superseded,
}

/// What the viewer asked for; the daemon acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// The viewer opened the catalog (the daemon may refresh it).
    ShowCatalog,
    /// The viewer chose an item; the daemon reads the card and sends an `Offer` (or an error).
    SelectCatalogItem(CatalogId),
    /// The catalog's cursor came to rest on an item (said once per change, and again when
    /// the catalog is shown anew): the daemon may ask for its offer ahead of OK.
    HighlightCatalogItem(CatalogId),
    /// The viewer pressed OK on the offer popup — the explicit confirmation.
    AcceptOffer(TxId),
    CancelOffer {
        txid: TxId,
        reason: CancelReason,
    },
    StartLoad {
        source: LoadSource,
    },
    /// Confirmed load amount in minor units of the card's currency; never above the `LoadMax`.
    SubmitLoadAmount(i64),
    /// BACK out of the load amount entry.
    CancelLoad,
    SubmitPin(Pin),
    CancelPin,
    ShowHistory,
    /// The viewer chose the privacy switch: turn the card's privacy `on` or off (the daemon
    /// may ask for the card's PIN first).
    SetPrivacy {
        on: bool,
    },
    /// "Receive from another card": the daemon answers with [`UiUpdate::ReceiveMax`].
    StartReceive,
    /// The amount to receive, in minor units of the card's currency; the daemon answers
    /// with [`UiUpdate::TransferCode`].
    ReceiveAmount(i64),
    /// The code the receiver's TV showed; the daemon answers with
    /// [`UiUpdate::TransferTerms`].
    JoinTransfer(String),
    /// OK on the terms: the card sends.
    ConfirmTransfer,
    /// BACK while a transfer waits for the viewer or the other box.
    CancelTransfer,
    Quit,
}

/// A PIN as typed: digits only. Its `Debug` never shows the digits, so logging an `Intent`
/// is safe; the buffer is overwritten when dropped.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Pin(String);

impl Pin {
    pub fn new() -> Self {
        Pin(String::new())
    }

    /// Appends a digit; `false` (and no change) for anything but 0–9 or past `max_len`.
    pub fn push(&mut self, digit: char, max_len: usize) -> bool {
        if !digit.is_ascii_digit() || self.0.len() >= max_len {
            return false;
        }
        self.0.push(digit);
        true
    }

    pub fn pop(&mut self) -> bool {
        self.0.pop().is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The digits, for the daemon to hand to the bank. Deliberately the only way to read them.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({} digits)", self.0.len())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        // Best effort without an extra crate: zero the bytes before the memory is freed;
        // black_box keeps the optimiser from dropping the dead store.
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.fill(0);
        std::hint::black_box(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_debug_hides_digits() {
        let mut pin = Pin::new();
        for d in "4711".chars() {
            assert!(pin.push(d, 6));
        }
        let shown = format!("{:?}", Intent::SubmitPin(pin.clone()));
        assert!(!shown.contains("4711"), "{shown}");
        assert!(shown.contains("4 digits"), "{shown}");
        assert_eq!(pin.expose(), "4711");
    }

    #[test]
    fn pin_refuses_non_digits_and_overflow() {
        let mut pin = Pin::new();
        assert!(!pin.push('a', 4));
        assert!(!pin.push('-', 4));
        for d in "1234".chars() {
            assert!(pin.push(d, 4));
        }
        assert!(!pin.push('5', 4));
        assert_eq!(pin.expose(), "1234");
    }
}
