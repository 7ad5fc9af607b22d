//! Phoenix/Smartmouse reader emulator on a pty.
