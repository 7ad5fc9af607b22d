//! A driver that puts the in-process virtual purse card behind the Reader API.
