//! The box's transaction flows as sans-IO state machines: inputs in (gateway answers, card
//! responses, viewer decisions, failures), actions out (send a message, send an APDU, write
//! the journal, update the UI). No sockets, readers or clocks here; the daemon's shell
//! executes the actions in order and feeds the results back.
//!
//! - [`purchase`]: one purchase (draw), 001 [0071]–[0094].
//! - [`recovery`]: what to do with an in-doubt purchase, given the journal, the card's log
//!   and the head end's answers; the recovery timer's schedule.
//! - [`load`]: one load of value onto the card, 001 [0117]–[0160], and its recovery.

pub mod load;
pub mod purchase;
pub mod recovery;

/// A retry delay: `initial · 2^attempt`, capped at `max`, then a random point in its upper
/// half (jitter), so a fleet of boxes that lost the head end together does not come back in
/// lockstep. Used for reconnects and for the recovery timer.
pub fn backoff(
    attempt: u32,
    initial: std::time::Duration,
    max: std::time::Duration,
    rng: &mut impl rand::Rng,
) -> std::time::Duration {
    let exp = initial
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let half = exp / 2;
    half + std::time::Duration::from_nanos(
        rng.gen_range(0..=half.as_nanos().min(u64::MAX as u128) as u64),
    )
}

/// proto's money → the UI's money (the UI crate has no proto dependency).
pub fn ui_money(m: proto::money::Money) -> ui::Money {
    ui::Money::new(
        i64::try_from(m.minor).unwrap_or(i64::MAX),
        ui::Currency::new(m.currency.code, m.currency.exponent),
    )
}

pub fn ui_date(d: proto::purse::Date) -> ui::model::Date {
    ui::model::Date::new(d.year, d.month, d.day)
}

/// Splits a response APDU into data and status word; `None` if it has no status word.
pub fn split_sw(resp: &[u8]) -> Option<(&[u8], proto::apdu::StatusWord)> {
    let (data, sw) = resp.split_last_chunk::<2>()?;
    Some((data, proto::apdu::StatusWord(u16::from_be_bytes(*sw))))
}
