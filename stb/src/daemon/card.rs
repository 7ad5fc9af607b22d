//! The card side of the shell: which driver and reader, one open session at a time, and the
//! reads the daemon does outside the flows (card summary, the card's log for recovery).

use std::sync::Arc;
use std::time::Duration;

use proto::card::{LOG_CAPACITY, commands};
use proto::purse::{Date, LogRecord, PurseInfo};
use reader_drivers::api::is_select;
use reader_drivers::serial::{SerialConfig, SerialDriver};
use reader_drivers::vcard::VirtualCard;
use reader_drivers::virtual_driver::VirtualDriver;
use reader_drivers::{CardSession, ReaderDriver, ReaderError, transmit_whole};

use crate::config::{DetectLine, Level, ReaderConfig, SerialProfile, glob_match};
use stb_flow::split_sw;
use stb_flow::{CardFailure, CardReply};

/// Builds the driver the config names, and the reader-name pattern to watch for.
pub fn driver_for(cfg: &ReaderConfig) -> Result<(Arc<dyn ReaderDriver>, String), String> {
    Ok(match cfg {
        ReaderConfig::Pcsc { name } => (
            Arc::new(reader_drivers::pcsc::PcscDriver::new()) as Arc<dyn ReaderDriver>,
            name.clone(),
        ),
        ReaderConfig::Serial { .. } => {
            let c = serial_config(cfg)?;
            (Arc::new(SerialDriver::new(c)), "serial".into())
        }
        ReaderConfig::Virtual { card_file } => {
            let card = VirtualCard::open(card_file).map_err(|e| e.to_string())?;
            let d = VirtualDriver::with_card("virtual", card);
            (Arc::new(d), "virtual".into())
        }
    })
}

/// The serial driver's settings from `[reader]`: the profile's wiring, each key overriding
/// one part of it.
pub fn serial_config(cfg: &ReaderConfig) -> Result<SerialConfig, String> {
    use reader_drivers::serial::{CardDetect, InputLine, Profile};
    let ReaderConfig::Serial {
        device,
        profile,
        clock_hz,
        reset,
        reset_asserted,
        card_detect,
        card_present,
        echo,
        max_baud,
        guard_etu,
        pps,
        modem_lines,
    } = cfg
    else {
        return Err("not a serial reader".into());
    };
    let profile = match profile {
        SerialProfile::Phoenix => Profile::Phoenix,
        SerialProfile::Smartmouse => Profile::Smartmouse,
    };
    let mut c = SerialConfig::with_profile("serial", device.clone(), profile);
    if let Some(hz) = clock_hz {
        c.clock_hz = *hz;
    }
    if let Some(r) = reset {
        c.lines.reset = *r;
    }
    if let Some(l) = reset_asserted {
        c.lines.reset_inverted = *l == Level::Low;
    }
    let inverted = |l: &Option<Level>, current: bool| l.map_or(current, |l| l == Level::Low);
    let current_inverted = match c.lines.detect {
        CardDetect::Line { inverted, .. } => inverted,
        CardDetect::None => false,
    };
    let line = match card_detect {
        Some(DetectLine::None) => None,
        Some(DetectLine::Cd) => Some(InputLine::Cd),
        Some(DetectLine::Dsr) => Some(InputLine::Dsr),
        Some(DetectLine::Cts) => Some(InputLine::Cts),
        Some(DetectLine::Ri) => Some(InputLine::Ri),
        None => match c.lines.detect {
            CardDetect::Line { line, .. } => Some(line),
            CardDetect::None => None,
        },
    };
    c.lines.detect = match line {
        Some(line) => CardDetect::Line {
            line,
            inverted: inverted(card_present, current_inverted),
        },
        None => CardDetect::None,
    };
    if let Some(e) = echo {
        c.echo = *e;
    }
    if let Some(b) = max_baud {
        c.max_baud = *b;
    }
    if let Some(g) = guard_etu {
        c.guard_etu = *g;
    }
    if let Some(p) = pps {
        c.pps = *p;
    }
    if let Some(m) = modem_lines {
        c.modem_lines = crate::config::parse_modem_lines(m).map_err(|e| e.to_string())?;
    }
    Ok(c)
}

/// The card in the watched reader, through one session opened on demand.
///
/// Several readers may match the pattern: the port uses one of them (the first that had a
/// card) and keeps the others that hold a card as fallbacks. A card pulled from a fallback
/// reader changes nothing; when the card in use goes, the port falls back to another reader
/// that holds one ([`CardPort::card_removed`]).
///
/// Commands run in *sequences* (SELECT → READ PURSE, SELECT → INITIALIZE → … → DEBIT): the first
/// command of a sequence begins a reader transaction, which [`CardPort::end_sequence`] or
/// [`CardPort::release`] ends, so no other program on the same pcscd (OSCam, OpenSC) can slip
/// a command or a reset in between. Every sequence starts with SELECT; a reset by another
/// program between two sequences is reported by the reader and the SELECT starts over.
pub struct CardPort {
    driver: Arc<dyn ReaderDriver>,
    pattern: String,
    /// The reader in use: a matching reader with a card in it, per the reader events.
    reader: Option<String>,
    /// Matching readers that hold a card, in the order their cards came (the one in use too).
    with_card: Vec<String>,
    session: Option<(Box<dyn CardSession>, Vec<u8>)>,
    /// A sequence is open: the session holds a reader transaction.
    in_sequence: bool,
    timeout: Duration,
}

/// What a removal meant for the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The reader was not the one in use: nothing changes.
    NotInUse,
    /// The card in use went; `fallback` is the reader now in use, if another holds a card.
    InUse { fallback: Option<String> },
}

impl CardPort {
    pub fn new(driver: Arc<dyn ReaderDriver>, pattern: String, timeout: Duration) -> Self {
        Self {
            driver,
            pattern,
            reader: None,
            with_card: Vec::new(),
            session: None,
            in_sequence: false,
            timeout,
        }
    }

    pub fn driver(&self) -> &Arc<dyn ReaderDriver> {
        &self.driver
    }

    pub fn matches(&self, reader: &str) -> bool {
        glob_match(&self.pattern, reader)
    }

    /// The reader in use.
    pub fn reader(&self) -> Option<&str> {
        self.reader.as_deref()
    }

    /// A card came into `reader`. True when it is now the card in use (no card was, or the
    /// card in use was reinserted); a card in another reader is kept as a fallback.
    pub fn card_inserted(&mut self, reader: &str) -> bool {
        if !self.with_card.iter().any(|r| r == reader) {
            self.with_card.push(reader.to_string());
        }
        match self.reader.as_deref() {
            Some(r) if r != reader => false,
            _ => {
                self.reader = Some(reader.to_string());
                self.drop_session();
                true
            }
        }
    }

    /// The card left `reader` (or the reader went). Only the reader in use matters; then the
    /// port falls back to the reader whose card came first among the others.
    pub fn card_removed(&mut self, reader: &str) -> Removal {
        self.with_card.retain(|r| r != reader);
        if self.reader.as_deref() != Some(reader) {
            return Removal::NotInUse;
        }
        self.drop_session();
        self.reader = self.with_card.first().cloned();
        Removal::InUse {
            fallback: self.reader.clone(),
        }
    }

    pub fn has_card(&self) -> bool {
        self.reader.is_some()
    }

    /// Forgets the session without talking to the reader (its card is gone or it failed):
    /// dropping it ends any transaction and leaves the card.
    fn drop_session(&mut self) {
        self.session = None;
        self.in_sequence = false;
    }

    /// Ends the current sequence: the reader transaction ends and other programs may use the
    /// card again. The session stays open (a reset meanwhile shows at the next sequence).
    pub async fn end_sequence(&mut self) {
        if !std::mem::take(&mut self.in_sequence) {
            return;
        }
        if let Some((s, _)) = self.session.as_mut() {
            match tokio::time::timeout(self.timeout, s.end_transaction()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot end the card transaction; closing the session");
                    self.drop_session();
                }
                Err(_) => {
                    tracing::warn!("ending the card transaction timed out; closing the session");
                    self.drop_session();
                }
            }
        }
    }

    /// Ends the sequence and the session (the next command connects again). On PC/SC the card
    /// is left powered for other programs.
    pub async fn release(&mut self) {
        self.end_sequence().await;
        if let Some((mut s, _)) = self.session.take() {
            let _ = s.power_down().await;
        }
    }

    /// Connects if needed and begins a sequence if none is open.
    async fn open_sequence(&mut self, reader: &str, apdu: &[u8]) -> Result<(), CardFailure> {
        if self.session.is_none() {
            let s = tokio::time::timeout(self.timeout, self.driver.connect(reader))
                .await
                .map_err(|_| CardFailure::NoAtr {
                    reader: reader.to_string(),
                })?
                .map_err(card_failure)?;
            self.session = Some(s);
        }
        if self.in_sequence {
            return Ok(());
        }
        let (session, _) = self.session.as_mut().expect("just opened");
        let reset = match tokio::time::timeout(self.timeout, session.begin_transaction()).await {
            Ok(Ok(reset)) => reset,
            Ok(Err(e)) => {
                self.drop_session();
                return Err(card_failure(e));
            }
            Err(_) => {
                self.drop_session();
                return Err(CardFailure::InUse {
                    reader: reader.to_string(),
                    waited: self.timeout,
                });
            }
        };
        self.in_sequence = true;
        if reset {
            if is_select(apdu) {
                tracing::info!(%reader, "the card was reset by another application; selecting again");
            } else {
                // Every sequence of ours starts with SELECT; this one relied on a selection
                // the reset took away.
                self.end_sequence().await;
                return Err(CardFailure::Reset {
                    reader: reader.to_string(),
                });
            }
        }
        Ok(())
    }

    /// One APDU, connecting first if needed, inside the current sequence (begun here if none
    /// is open).
    ///
    /// # Errors
    ///
    /// What the reader saw, as the flows take it ([`CardFailure`]): no card in the port,
    /// the card pulled or mute, no answer in time, the card held or reset by another
    /// application, any other reader fault.
    pub async fn transmit(&mut self, apdu: &[u8]) -> Result<CardReply, CardFailure> {
        let reader = self.reader.clone().ok_or(CardFailure::NoCard)?;
        self.open_sequence(&reader, apdu).await?;
        let (session, atr) = self.session.as_mut().expect("opened");
        let atr = atr.clone();
        match tokio::time::timeout(self.timeout, transmit_whole(session.as_mut(), apdu)).await {
            Ok(Ok(response)) => Ok(CardReply { atr, response }),
            Ok(Err(e)) => {
                self.drop_session();
                Err(card_failure(e))
            }
            Err(_) => {
                self.drop_session();
                Err(CardFailure::NoAnswer {
                    reader,
                    waited: self.timeout,
                })
            }
        }
    }

    /// A command that must succeed; its data.
    ///
    /// # Errors
    ///
    /// In words: the card's failure ([`CardPort::transmit`]), a refusal, no status word.
    pub async fn expect_ok(&mut self, apdu: &[u8]) -> Result<Vec<u8>, String> {
        let r = self.transmit(apdu).await.map_err(|e| e.to_string())?;
        match split_sw(&r.response) {
            Some((data, sw)) if sw.is_ok() => Ok(data.to_vec()),
            Some((_, sw)) => Err(format!("the card refused: {sw}")),
            None => Err("the card answered without a status word".into()),
        }
    }

    /// SELECT + READ PURSE (a sequence: the caller ends it, or releases the card).
    ///
    /// # Errors
    ///
    /// In words: as [`CardPort::expect_ok`], or a READ PURSE answer that does not decode.
    pub async fn read_purse(&mut self) -> Result<PurseInfo, String> {
        self.expect_ok(&commands::select()).await?;
        let d = self.expect_ok(&commands::read_purse()).await?;
        PurseInfo::decode(&d).map_err(|e| format!("READ PURSE answer malformed: {e}"))
    }

    /// The card's log, newest first (after a SELECT).
    ///
    /// # Errors
    ///
    /// In words: the card's failure ([`CardPort::transmit`]), a record that does not decode,
    /// an answer without a status word.
    pub async fn read_log(&mut self) -> Result<Vec<LogRecord>, String> {
        let mut out = Vec::new();
        for n in 1..=LOG_CAPACITY.min(255) as u8 {
            let r = self
                .transmit(&commands::read_log(n))
                .await
                .map_err(|e| e.to_string())?;
            match split_sw(&r.response) {
                Some((data, sw)) if sw.is_ok() => out.push(
                    LogRecord::decode(data)
                        .map_err(|e| format!("log record {n} malformed: {e}"))?,
                ),
                // Past the last record.
                Some(_) => break,
                None => return Err("READ LOG answer without a status word".into()),
            }
        }
        Ok(out)
    }
}

/// A reader error as the flows take it: the card gone (pulled, mute, not there) is told
/// from a reset by another application and from any other reader fault. The text is the
/// reader's.
#[must_use]
pub fn card_failure(e: ReaderError) -> CardFailure {
    match e {
        ReaderError::NoCard { .. } | ReaderError::CardRemoved { .. } | ReaderError::Mute { .. } => {
            CardFailure::Removed(e.to_string())
        }
        ReaderError::CardReset { reader } => CardFailure::Reset { reader },
        e => CardFailure::Reader(e.to_string()),
    }
}

/// Today's date (UTC) from the system clock, for INITIALIZE and the expiry check.
pub fn today() -> Date {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_from_days((secs / 86_400) as i64)
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's algorithm.
pub fn civil_from_days(z: i64) -> Date {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Date::new(y as u16, m as u8, d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_count_only_for_the_reader_in_use_which_falls_back_to_another_card() {
        let driver = Arc::new(reader_drivers::virtual_driver::VirtualDriver::new("unused"));
        let mut p = CardPort::new(driver, "R*".into(), Duration::from_secs(1));
        assert!(p.card_inserted("R0"));
        assert!(!p.card_inserted("R1"), "a second card does not take over");
        assert!(!p.card_inserted("R2"));
        assert_eq!(p.reader(), Some("R0"));
        assert_eq!(p.card_removed("R1"), Removal::NotInUse);
        assert_eq!(p.reader(), Some("R0"));
        assert_eq!(
            p.card_removed("R0"),
            Removal::InUse {
                fallback: Some("R2".into())
            }
        );
        assert_eq!(p.card_removed("R9"), Removal::NotInUse);
        assert_eq!(p.card_removed("R2"), Removal::InUse { fallback: None });
        assert!(!p.has_card());
        // The card in use reinserted (a pull between two polls) is the card in use again.
        assert!(p.card_inserted("R1"));
        assert!(p.card_inserted("R1"));
    }

    /// The card gone is told from a reset and from any other fault; the text stays the
    /// reader's.
    #[test]
    fn reader_errors_map_to_the_card_failure_the_flows_take() {
        let reader = || "R0".to_string();
        for (e, want) in [
            (ReaderError::CardRemoved { reader: reader() }, "removed"),
            (ReaderError::NoCard { reader: reader() }, "removed"),
            (ReaderError::Mute { reader: reader() }, "removed"),
            (ReaderError::CardReset { reader: reader() }, "reset"),
            (ReaderError::InUse { reader: reader() }, "reader"),
            (ReaderError::Parity { reader: reader() }, "reader"),
            (ReaderError::ServiceNotRunning, "reader"),
        ] {
            let text = e.to_string();
            let f = card_failure(e);
            let kind = match &f {
                CardFailure::Removed(_) => "removed",
                CardFailure::Reset { .. } => "reset",
                CardFailure::Reader(_) => "reader",
                other => panic!("{other:?}"),
            };
            assert_eq!(kind, want, "{text}");
            assert_eq!(f.to_string(), text, "the reader's words");
        }
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), Date::new(1970, 1, 1));
        assert_eq!(civil_from_days(20_779), Date::new(2026, 11, 22));
        assert_eq!(civil_from_days(11_016), Date::new(2000, 2, 29));
    }
}
