//! vsmartcard vpcd client: attaches a card to pcscd's "Virtual PCD" reader.
