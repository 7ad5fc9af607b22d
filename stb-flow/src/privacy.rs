//! The cardholder's privacy switch (seed 004 PASSBOOK and privacy; 002's anonymous payment
//! on request), as a sans-IO flow: SELECT, VERIFY when the card has a PIN, SET PRIVACY.
//! With privacy on the card's passbook is never uploaded to the bank, and its INITIALIZE
//! FOR PURCHASE says so under its MAC, so the payment server names it only by a
//! per-transaction pseudonym.
//!
//! A card without a PIN takes SET PRIVACY as it is; a card with one answers `6982` until
//! VERIFY succeeds in the same session: the flow then asks the viewer for the PIN
//! ([`Next::NeedsPin`]) and the shell starts it again with it ([`SetPrivacy::new`]). No
//! journal: nothing here moves value, and a switch the card did not take is simply not
//! shown as taken.

use proto::apdu::StatusWord;
use proto::card::{SW_SECURITY_NOT_SATISFIED, commands};
use proto::secret::Secret;

use crate::load::{PIN_MAX, PIN_MIN};
use crate::show::Refusal;

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this APDU to the card; its status word comes back through [`SetPrivacy::card`].
    Apdu(Vec<u8>),
    /// The card has a PIN: ask the viewer for it, then start again with it.
    NeedsPin { min: u8, max: u8 },
    /// The card took it: privacy is now `on`.
    Done { on: bool },
    /// Not taken; nothing changed on the card.
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Select,
    Verify,
    Set,
    Over,
}

/// One attempt at turning privacy `on` or off.
pub struct SetPrivacy {
    on: bool,
    pin: Option<Secret<String>>,
    state: State,
}

impl SetPrivacy {
    /// An attempt, with the PIN the viewer typed if the card asked for one.
    pub fn new(on: bool, pin: Option<Secret<String>>) -> Self {
        Self {
            on,
            pin,
            state: State::Select,
        }
    }

    /// The first command (SELECT).
    pub fn start(&mut self) -> Next {
        self.state = State::Select;
        Next::Apdu(commands::select())
    }

    /// The card's status word for the last command.
    pub fn card(&mut self, sw: StatusWord) -> Next {
        let refused = |sw| Next::Refused(Refusal::CardRefused { sw });
        match self.state {
            State::Select if !sw.is_ok() => {
                self.state = State::Over;
                refused(sw)
            }
            State::Select => match &self.pin {
                Some(pin) => match commands::verify_pin(pin.expose()) {
                    Some(v) => {
                        self.state = State::Verify;
                        Next::Apdu(v)
                    }
                    None => {
                        self.state = State::Over;
                        Next::Refused(Refusal::BadPin {
                            min: PIN_MIN,
                            max: PIN_MAX,
                        })
                    }
                },
                None => self.set(),
            },
            State::Verify if sw.is_ok() => self.set(),
            State::Verify => {
                self.state = State::Over;
                Next::Refused(match sw.pin_tries_left() {
                    Some(0) => Refusal::PinBlocked,
                    Some(tries_left) => Refusal::WrongPin { tries_left },
                    None => Refusal::CardRefused { sw },
                })
            }
            State::Set if sw.is_ok() => {
                self.state = State::Over;
                Next::Done { on: self.on }
            }
            State::Set if sw == SW_SECURITY_NOT_SATISFIED && self.pin.is_none() => {
                self.state = State::Over;
                Next::NeedsPin {
                    min: PIN_MIN,
                    max: PIN_MAX,
                }
            }
            State::Set | State::Over => {
                self.state = State::Over;
                refused(sw)
            }
        }
    }

    fn set(&mut self) -> Next {
        self.state = State::Set;
        Next::Apdu(commands::set_privacy(self.on))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::card::{CardSpec, CardState, PurseCard};
    use proto::crypto::DesKey;
    use proto::purse::{Expiry, IssuerKeys};

    fn card(pin: Option<&str>) -> PurseCard {
        let issuer = IssuerKeys {
            key_version: 1,
            purchase_master: DesKey::new([0x11; 16]),
            load_master: DesKey::new([0x22; 16]),
        };
        let spec = CardSpec {
            card_id: 0x1234,
            provider_id: 1,
            currency: proto::money::Currency::EUR,
            balance: 10_000,
            max_balance: 100_000,
            expiry: Expiry {
                year: 2030,
                month: 12,
            },
        };
        let mut state = CardState::personalise(&spec, &issuer);
        if let Some(p) = pin {
            state = state.with_pin(p, 500).unwrap();
        }
        PurseCard::new(state, 7)
    }

    /// Runs the flow against `card`; the last `Next`.
    fn run(card: &mut PurseCard, on: bool, pin: Option<&str>) -> Next {
        let mut f = SetPrivacy::new(on, pin.map(|p| Secret::new(p.to_string())));
        let mut next = f.start();
        while let Next::Apdu(apdu) = next {
            let out = card.process(&apdu);
            let (_, sw) = crate::split_sw(&out.response).expect("a status word");
            next = f.card(sw);
        }
        next
    }

    #[test]
    fn a_card_without_a_pin_takes_the_switch_both_ways() {
        let mut c = card(None);
        assert_eq!(run(&mut c, true, None), Next::Done { on: true });
        assert!(c.state.privacy);
        assert_eq!(run(&mut c, false, None), Next::Done { on: false });
        assert!(!c.state.privacy);
    }

    #[test]
    fn a_card_with_a_pin_asks_for_it_and_counts_a_wrong_one() {
        let mut c = card(Some("4711"));
        assert_eq!(
            run(&mut c, true, None),
            Next::NeedsPin {
                min: PIN_MIN,
                max: PIN_MAX
            }
        );
        assert!(!c.state.privacy, "not without the PIN");
        assert_eq!(
            run(&mut c, true, Some("1111")),
            Next::Refused(Refusal::WrongPin { tries_left: 2 })
        );
        assert!(!c.state.privacy);
        assert_eq!(
            run(&mut c, true, Some("12")),
            Next::Refused(Refusal::BadPin {
                min: PIN_MIN,
                max: PIN_MAX
            })
        );
        assert_eq!(run(&mut c, true, Some("4711")), Next::Done { on: true });
        assert!(c.state.privacy);
        for _ in 0..3 {
            run(&mut c, false, Some("0000"));
        }
        assert_eq!(
            run(&mut c, false, Some("4711")),
            Next::Refused(Refusal::PinBlocked)
        );
        assert!(c.state.privacy, "a blocked PIN changes nothing");
    }
}
