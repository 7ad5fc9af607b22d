//! The card side of the shell: which driver and reader, one open session at a time, and the
//! reads the daemon does outside the flows (card summary, the card's log for recovery).

use std::sync::Arc;
use std::time::Duration;

use proto::card::{LOG_CAPACITY, commands};
use proto::purse::{Date, LogRecord, PurseInfo};
use reader_drivers::serial::{SerialConfig, SerialDriver};
use reader_drivers::vcard::VirtualCard;
use reader_drivers::virtual_driver::VirtualDriver;
use reader_drivers::{CardSession, ReaderDriver, transmit_whole};

use crate::config::{DetectLine, Level, ReaderConfig, SerialProfile, glob_match};
use crate::flow::purchase::CardReply;
use crate::flow::split_sw;

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
        c.modem_lines = crate::config::parse_modem_lines(m)?;
    }
    Ok(c)
}

/// The card in the watched reader, through one session opened on demand.
pub struct CardPort {
    driver: Arc<dyn ReaderDriver>,
    pattern: String,
    /// The matching reader with a card in it, per the reader events.
    reader: Option<String>,
    session: Option<(Box<dyn CardSession>, Vec<u8>)>,
    timeout: Duration,
}

impl CardPort {
    pub fn new(driver: Arc<dyn ReaderDriver>, pattern: String, timeout: Duration) -> Self {
        Self {
            driver,
            pattern,
            reader: None,
            session: None,
            timeout,
        }
    }

    pub fn driver(&self) -> &Arc<dyn ReaderDriver> {
        &self.driver
    }

    pub fn matches(&self, reader: &str) -> bool {
        glob_match(&self.pattern, reader)
    }

    pub fn card_inserted(&mut self, reader: &str) {
        self.reader = Some(reader.to_string());
        self.session = None;
    }

    pub fn card_removed(&mut self) {
        self.reader = None;
        self.session = None;
    }

    pub fn has_card(&self) -> bool {
        self.reader.is_some()
    }

    /// Ends the session (the next command powers the card up again).
    pub async fn release(&mut self) {
        if let Some((mut s, _)) = self.session.take() {
            let _ = s.power_down().await;
        }
    }

    /// One APDU, connecting first if needed; errors are the reader's, in words.
    pub async fn transmit(&mut self, apdu: &[u8]) -> Result<CardReply, String> {
        let reader = self.reader.clone().ok_or("no card in the reader")?;
        if self.session.is_none() {
            let s = tokio::time::timeout(self.timeout, self.driver.connect(&reader))
                .await
                .map_err(|_| format!("reader {reader}: no answer to reset"))?
                .map_err(|e| e.to_string())?;
            self.session = Some(s);
        }
        let (session, atr) = self.session.as_mut().expect("just opened");
        let atr = atr.clone();
        match tokio::time::timeout(self.timeout, transmit_whole(session.as_mut(), apdu)).await {
            Ok(Ok(response)) => Ok(CardReply { atr, response }),
            Ok(Err(e)) => {
                self.session = None;
                Err(e.to_string())
            }
            Err(_) => {
                self.session = None;
                Err(format!(
                    "reader {reader}: the card did not answer in {:?}",
                    self.timeout
                ))
            }
        }
    }

    /// A command that must succeed; its data.
    pub async fn expect_ok(&mut self, apdu: &[u8]) -> Result<Vec<u8>, String> {
        let r = self.transmit(apdu).await?;
        match split_sw(&r.response) {
            Some((data, sw)) if sw.is_ok() => Ok(data.to_vec()),
            Some((_, sw)) => Err(format!("the card refused: {sw}")),
            None => Err("the card answered without a status word".into()),
        }
    }

    /// SELECT + READ PURSE.
    pub async fn read_purse(&mut self) -> Result<PurseInfo, String> {
        self.expect_ok(&commands::select()).await?;
        let d = self.expect_ok(&commands::read_purse()).await?;
        PurseInfo::decode(&d).map_err(|e| format!("READ PURSE answer malformed: {e}"))
    }

    /// The card's log, newest first (after a SELECT).
    pub async fn read_log(&mut self) -> Result<Vec<LogRecord>, String> {
        let mut out = Vec::new();
        for n in 1..=LOG_CAPACITY.min(255) as u8 {
            let r = self.transmit(&commands::read_log(n)).await?;
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
    fn civil_dates() {
        assert_eq!(civil_from_days(0), Date::new(1970, 1, 1));
        assert_eq!(civil_from_days(20_779), Date::new(2026, 11, 22));
        assert_eq!(civil_from_days(11_016), Date::new(2000, 2, 29));
    }
}
