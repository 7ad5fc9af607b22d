//! A driver that puts the in-process virtual purse card behind the Reader API.
//!
//! One reader slot holding any [`CardApplication`] (usually a file-backed
//! [`crate::vcard::VirtualCard`]). Tests insert and pull the card with [`VirtualDriver::insert`]
//! and [`VirtualDriver::remove`]; watchers get the same `CardInserted` / `CardRemoved` events a
//! PC/SC reader gives. A session opened on one insertion fails with `CardRemoved` once that
//! card is pulled, even if another card is inserted later, as a real reader does.
//!
//! A pull can be armed to land in the middle of one command ([`VirtualDriver::pull_during`]):
//! the viewer pulling the card while it runs an update.

use std::sync::{Arc, Mutex, MutexGuard};

use proto::apdu::CardApplication;
use tokio::sync::mpsc;

use crate::api::{
    BoxFuture, CardPresence, CardSession, ReaderDriver, ReaderError, ReaderEvent, ReaderInfo,
};

type Card = Box<dyn CardApplication>;

struct Slot {
    card: Option<Card>,
    /// Bumped on every insertion, so a session knows its card is still the one in the slot.
    insertion: u64,
    watchers: Vec<mpsc::Sender<ReaderEvent>>,
    /// A pull armed for the next command with this INS ([`VirtualDriver::pull_during`]).
    armed: Option<(u8, PullAt)>,
}

/// Where an armed pull lands in the command it interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullAt {
    /// The card loses power before it runs the command: nothing on it changed.
    Before,
    /// The card ran the command (its state written), and the answer is lost with it.
    After,
}

/// The in-process virtual reader with one card slot.
#[derive(Clone)]
pub struct VirtualDriver {
    reader: Arc<str>,
    slot: Arc<Mutex<Slot>>,
}

impl VirtualDriver {
    /// A reader named `reader` with an empty slot.
    pub fn new(reader: &str) -> Self {
        Self {
            reader: reader.into(),
            slot: Arc::new(Mutex::new(Slot {
                card: None,
                insertion: 0,
                watchers: Vec::new(),
                armed: None,
            })),
        }
    }

    /// A reader with `card` already inserted.
    pub fn with_card(reader: &str, card: impl CardApplication + 'static) -> Self {
        let d = Self::new(reader);
        d.insert(card);
        d
    }

    pub fn reader_name(&self) -> &str {
        &self.reader
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding the lock cannot leave the slot half-changed (every change is
        // one assignment), so a poisoned lock is still usable.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a card (replacing any card in the slot) and tells the watchers.
    pub fn insert(&self, mut card: impl CardApplication + 'static) {
        card.reset();
        let atr = card.atr();
        let mut slot = self.lock();
        if slot.card.take().is_some() {
            broadcast(
                &mut slot,
                ReaderEvent::CardRemoved {
                    reader: self.reader.to_string(),
                },
            );
        }
        slot.card = Some(Box::new(card));
        slot.insertion += 1;
        broadcast(
            &mut slot,
            ReaderEvent::CardInserted {
                reader: self.reader.to_string(),
                atr,
            },
        );
    }

    /// Pulls the card out; returns whether there was one.
    pub fn remove(&self) -> bool {
        let mut slot = self.lock();
        let had = slot.card.take().is_some();
        if had {
            broadcast(
                &mut slot,
                ReaderEvent::CardRemoved {
                    reader: self.reader.to_string(),
                },
            );
        }
        had
    }

    /// Arms a pull for the next command whose INS is `ins`: the card leaves the slot
    /// [`PullAt::Before`] or [`PullAt::After`] it runs that command, watchers get
    /// `CardRemoved`, and the command fails with [`ReaderError::CardRemoved`], as when a
    /// viewer pulls the card mid-command.
    pub fn pull_during(&self, ins: u8, at: PullAt) {
        self.lock().armed = Some((ins, at));
    }

    pub fn has_card(&self) -> bool {
        self.lock().card.is_some()
    }
}

fn broadcast(slot: &mut Slot, ev: ReaderEvent) {
    // A watcher that stopped listening (receiver dropped) is forgotten; a full one misses
    // the event rather than blocking the test or the card.
    slot.watchers.retain(|w| match w.try_send(ev.clone()) {
        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    });
}

impl ReaderDriver for VirtualDriver {
    fn kind(&self) -> &'static str {
        "virtual"
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ReaderInfo>, ReaderError>> {
        let card = match &self.lock().card {
            Some(c) => CardPresence::Present { atr: c.atr() },
            None => CardPresence::Absent,
        };
        let info = ReaderInfo {
            name: self.reader.to_string(),
            card,
        };
        Box::pin(async move { Ok(vec![info]) })
    }

    fn events(&self) -> mpsc::Receiver<ReaderEvent> {
        let (tx, rx) = mpsc::channel(64);
        let mut slot = self.lock();
        let _ = tx.try_send(ReaderEvent::ReaderAttached {
            reader: self.reader.to_string(),
        });
        if let Some(c) = &slot.card {
            let _ = tx.try_send(ReaderEvent::CardInserted {
                reader: self.reader.to_string(),
                atr: c.atr(),
            });
        }
        slot.watchers.push(tx);
        rx
    }

    fn connect<'a>(
        &'a self,
        reader: &'a str,
    ) -> BoxFuture<'a, Result<(Box<dyn CardSession>, Vec<u8>), ReaderError>> {
        Box::pin(async move {
            if reader != &*self.reader {
                return Err(ReaderError::UnknownReader {
                    reader: reader.to_string(),
                });
            }
            let mut slot = self.lock();
            let insertion = slot.insertion;
            let card = slot.card.as_mut().ok_or_else(|| ReaderError::NoCard {
                reader: reader.to_string(),
            })?;
            card.reset();
            let atr = card.atr();
            let session = VirtualSession {
                driver: self.clone(),
                insertion,
                open: true,
            };
            Ok((Box::new(session) as Box<dyn CardSession>, atr))
        })
    }
}

/// A session on the card that was in the slot at connect time.
struct VirtualSession {
    driver: VirtualDriver,
    insertion: u64,
    open: bool,
}

impl VirtualSession {
    fn with_card<T>(&self, f: impl FnOnce(&mut Card) -> T) -> Result<T, ReaderError> {
        let reader = self.driver.reader.to_string();
        if !self.open {
            return Err(ReaderError::Io {
                reader,
                detail: "session was powered down".into(),
            });
        }
        let mut slot = self.driver.lock();
        if slot.insertion != self.insertion {
            return Err(ReaderError::CardRemoved { reader });
        }
        match slot.card.as_mut() {
            Some(card) => Ok(f(card)),
            None => Err(ReaderError::CardRemoved { reader }),
        }
    }
}

impl VirtualSession {
    /// The armed pull, if `apdu` is its command on this session's card: the card runs it
    /// or not, then leaves the slot. `None`: no pull for this command.
    fn armed_pull(&self, apdu: &[u8]) -> Option<Result<Vec<u8>, ReaderError>> {
        let reader = self.driver.reader.to_string();
        let mut slot = self.driver.lock();
        let (ins, at) = slot.armed?;
        if !self.open || slot.insertion != self.insertion || apdu.get(1) != Some(&ins) {
            return None;
        }
        let mut card = slot.card.take()?;
        slot.armed = None;
        if at == PullAt::After {
            let _ = card.process_apdu(apdu);
        }
        broadcast(
            &mut slot,
            ReaderEvent::CardRemoved {
                reader: reader.clone(),
            },
        );
        Some(Err(ReaderError::CardRemoved { reader }))
    }
}

impl CardSession for VirtualSession {
    fn reader(&self) -> &str {
        &self.driver.reader
    }

    fn reset(&mut self) -> BoxFuture<'_, Result<Vec<u8>, ReaderError>> {
        let r = self.with_card(|c| {
            c.reset();
            c.atr()
        });
        Box::pin(async move { r })
    }

    fn transmit_raw<'a>(
        &'a mut self,
        apdu: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, ReaderError>> {
        let r = self
            .armed_pull(apdu)
            .unwrap_or_else(|| self.with_card(|c| c.process_apdu(apdu)));
        Box::pin(async move { r })
    }

    fn power_down(&mut self) -> BoxFuture<'_, Result<(), ReaderError>> {
        let r = self.with_card(|c| c.reset()).or_else(|e| match e {
            // Powering down a pulled card is not an error: it is already off.
            ReaderError::CardRemoved { .. } => Ok(()),
            e => Err(e),
        });
        self.open = false;
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::transmit_whole;
    use proto::card::{CardSpec, CardState, PurseCard, commands};
    use proto::crypto::DesKey;
    use proto::money::Currency;
    use proto::purse::{Expiry, IssuerKeys};

    struct Plain(PurseCard);
    impl CardApplication for Plain {
        fn atr(&self) -> Vec<u8> {
            proto::card::CARD_ATR.to_vec()
        }
        fn reset(&mut self) {}
        fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
            self.0.process(apdu).response
        }
    }

    fn card() -> Plain {
        let issuer = IssuerKeys {
            key_version: 1,
            purchase_master: DesKey::new([1; 16]),
            load_master: DesKey::new([2; 16]),
        };
        let spec = CardSpec {
            card_id: 5,
            provider_id: 1,
            currency: Currency::EUR,
            balance: 100,
            max_balance: 1000,
            expiry: Expiry {
                year: 2040,
                month: 1,
            },
        };
        Plain(PurseCard::new(CardState::personalise(&spec, &issuer), 1))
    }

    #[tokio::test]
    async fn insert_remove_events_and_stale_sessions() {
        let d = VirtualDriver::new("virtual 0");
        let mut ev = d.events();
        assert_eq!(
            ev.recv().await,
            Some(ReaderEvent::ReaderAttached {
                reader: "virtual 0".into()
            })
        );
        assert!(matches!(
            d.connect("virtual 0").await,
            Err(ReaderError::NoCard { .. })
        ));
        assert!(matches!(
            d.connect("other").await,
            Err(ReaderError::UnknownReader { .. })
        ));
        d.insert(card());
        assert!(matches!(
            ev.recv().await,
            Some(ReaderEvent::CardInserted { .. })
        ));
        let (mut s, atr) = d.connect("virtual 0").await.unwrap();
        assert_eq!(atr, proto::card::CARD_ATR.to_vec());
        let r = transmit_whole(s.as_mut(), &commands::select())
            .await
            .unwrap();
        assert!(r.ends_with(&[0x90, 0x00]));
        assert!(d.remove());
        assert!(matches!(
            ev.recv().await,
            Some(ReaderEvent::CardRemoved { .. })
        ));
        assert!(matches!(
            transmit_whole(s.as_mut(), &commands::select()).await,
            Err(ReaderError::CardRemoved { .. })
        ));
        // A new card does not revive the old session.
        d.insert(card());
        assert!(matches!(
            transmit_whole(s.as_mut(), &commands::select()).await,
            Err(ReaderError::CardRemoved { .. })
        ));
        assert!(s.power_down().await.is_ok());
    }

    /// A shared card, so the test can read its state after it left the slot.
    struct Shared(std::sync::Arc<std::sync::Mutex<PurseCard>>);
    impl CardApplication for Shared {
        fn atr(&self) -> Vec<u8> {
            proto::card::CARD_ATR.to_vec()
        }
        fn reset(&mut self) {}
        fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
            self.0.lock().unwrap().process(apdu).response
        }
    }

    #[tokio::test]
    async fn an_armed_pull_lands_before_or_after_its_command_and_the_command_fails() {
        for at in [PullAt::Before, PullAt::After] {
            let purse = std::sync::Arc::new(std::sync::Mutex::new(card().0));
            let d = VirtualDriver::with_card("virtual 0", Shared(purse.clone()));
            let mut ev = d.events();
            let _ = ev.recv().await; // attached
            let _ = ev.recv().await; // the card in it
            let (mut s, _) = d.connect("virtual 0").await.unwrap();
            transmit_whole(s.as_mut(), &commands::select())
                .await
                .unwrap();
            let init = commands::init_purchase(proto::purse::Date::new(2030, 1, 1));
            d.pull_during(init[1], at);
            // Other commands pass.
            assert!(
                transmit_whole(s.as_mut(), &commands::read_purse())
                    .await
                    .unwrap()
                    .ends_with(&[0x90, 0x00])
            );
            let before = purse.lock().unwrap().state.clone();
            assert!(matches!(
                transmit_whole(s.as_mut(), &init).await,
                Err(ReaderError::CardRemoved { .. })
            ));
            assert!(!d.has_card(), "{at:?}");
            assert!(matches!(
                ev.recv().await,
                Some(ReaderEvent::CardRemoved { .. })
            ));
            // INITIALIZE FOR PURCHASE counts the transaction on the card: it ran only
            // with the pull after.
            let ran = purse.lock().unwrap().state != before;
            assert_eq!(ran, at == PullAt::After, "{at:?}");
        }
    }
}
