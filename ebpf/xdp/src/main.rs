//! The host firewall, kernel side. Built for `bpfel-unknown-none` by the loader's build.rs;
//! on other targets this crate is an empty program so workspace-wide commands still work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod firewall;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
