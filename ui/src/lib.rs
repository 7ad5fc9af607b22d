//! The TV UI: screens, keymap, rendering
