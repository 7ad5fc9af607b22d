//! Purselink head end: gateway, payment, merchant, bank, load roles
