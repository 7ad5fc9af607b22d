//! Maps `pcsc::Error` to [`ReaderError`]s that name the reader and say what to do.

use crate::api::ReaderError;

/// True when the error means pcscd is gone (not running, or restarted under us): the context
/// must be re-established.
pub(crate) fn is_service_error(e: pcsc::Error) -> bool {
    matches!(
        e,
        pcsc::Error::NoService
            | pcsc::Error::ServiceStopped
            | pcsc::Error::InvalidHandle
            | pcsc::Error::CommError
            | pcsc::Error::Shutdown
    )
}

/// Maps a PC/SC error from an operation on `reader` (when there is one).
pub(crate) fn map_error(e: pcsc::Error, reader: Option<&str>) -> ReaderError {
    let reader = reader.unwrap_or("(any)").to_string();
    match e {
        pcsc::Error::NoService | pcsc::Error::ServiceStopped | pcsc::Error::Shutdown => {
            ReaderError::ServiceNotRunning
        }
        // A handle that stops being valid under us: pcscd restarted.
        pcsc::Error::InvalidHandle => ReaderError::ServiceNotRunning,
        pcsc::Error::NoReadersAvailable => ReaderError::NoReader,
        pcsc::Error::UnknownReader | pcsc::Error::ReaderUnavailable => {
            ReaderError::UnknownReader { reader }
        }
        pcsc::Error::NoSmartcard => ReaderError::NoCard { reader },
        pcsc::Error::RemovedCard => ReaderError::CardRemoved { reader },
        pcsc::Error::UnresponsiveCard | pcsc::Error::UnpoweredCard => ReaderError::Mute { reader },
        pcsc::Error::InvalidAtr | pcsc::Error::UnsupportedCard => ReaderError::BadAtr {
            reader,
            detail: format!("{e} — reinsert the card; if it persists the card is not supported"),
        },
        pcsc::Error::SharingViolation => ReaderError::InUse { reader },
        pcsc::Error::ProtoMismatch => ReaderError::Protocol {
            reader,
            detail: "the card does not speak the requested protocol (T=0/T=1)".into(),
        },
        pcsc::Error::Cancelled => ReaderError::Shutdown,
        pcsc::Error::Timeout => ReaderError::Io {
            reader,
            detail: "PC/SC call timed out — reinsert the card and retry".into(),
        },
        pcsc::Error::NotTransacted => ReaderError::Io {
            reader,
            detail: "the command could not be sent to the card — reinsert it".into(),
        },
        pcsc::Error::ResetCard => ReaderError::CardReset { reader },
        other => ReaderError::Io {
            reader,
            detail: format!("PC/SC error: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_reader_and_the_action() {
        let r = Some("Virtual PCD 00 00");
        assert_eq!(
            map_error(pcsc::Error::NoService, r).to_string(),
            "pcscd is not running — start it (systemctl start pcscd, or scripts/start-pcscd.sh without systemd) and try again"
        );
        assert_eq!(
            map_error(pcsc::Error::NoReadersAvailable, None).to_string(),
            "no reader attached — plug in a card reader"
        );
        assert_eq!(
            map_error(pcsc::Error::UnresponsiveCard, r).to_string(),
            "reader Virtual PCD 00 00: card is mute — reinsert it"
        );
        assert_eq!(
            map_error(pcsc::Error::RemovedCard, r),
            ReaderError::CardRemoved {
                reader: "Virtual PCD 00 00".into()
            }
        );
        assert_eq!(
            map_error(pcsc::Error::SharingViolation, r),
            ReaderError::InUse {
                reader: "Virtual PCD 00 00".into()
            }
        );
        assert_eq!(map_error(pcsc::Error::Cancelled, r), ReaderError::Shutdown);
        assert_eq!(
            map_error(pcsc::Error::ResetCard, r).to_string(),
            "reader Virtual PCD 00 00: the card was reset by another application — select the application again"
        );
        assert!(is_service_error(pcsc::Error::ServiceStopped));
        assert!(!is_service_error(pcsc::Error::RemovedCard));
    }
}
