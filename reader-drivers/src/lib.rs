//! Reader API and drivers: PC/SC, serial Phoenix/Smartmouse, virtual; the vcard virtual purse card
