//! Pseudo-terminals for one-off jobs run from a terminal (`flynn run bash`).
//!
//! The runner keeps the master: what the job writes is read from it, the caller's keys
//! are written to it (the line discipline turns ^C into SIGINT for the job's foreground
//! process group), and a resize sets its window size. The job's init gets the slave as
//! stdin, stdout and stderr; the command takes it as its controlling terminal.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use flynn_state::TtySize;

pub struct Pty {
    pub master: File,
    pub slave: OwnedFd,
}

/// A new pty pair of `size`; both ends close on exec, so no other child inherits them.
pub fn open(size: TtySize) -> io::Result<Pty> {
    let master = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?;
    let fd = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    #[allow(unsafe_code)]
    // SAFETY: ioctls on a descriptor this function owns, with a pointer to a live local of
    // the type TIOCSPTLCK reads; TIOCGPTPEER returns a new descriptor nothing else owns.
    let slave = unsafe {
        if libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) != 0 {
            return Err(io::Error::last_os_error());
        }
        // The slave opened through the master, not by path: no race with another pty, and
        // no dependence on where devpts is mounted.
        let peer = libc::ioctl(
            fd,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if peer < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(peer)
    };
    resize(&master, size)?;
    Ok(Pty { master, slave })
}

/// Sets the terminal's window size (the job gets SIGWINCH).
pub fn resize(master: &impl AsRawFd, size: TtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: TIOCSWINSZ reads a winsize from a pointer to a live local.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn t10_what_the_master_writes_the_slave_reads_and_the_size_is_set() {
        let pty = open(TtySize {
            cols: 100,
            rows: 30,
        })
        .unwrap();
        let mut ws: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        #[allow(unsafe_code)]
        // SAFETY: TIOCGWINSZ writes a winsize through a pointer to a live local.
        let r = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(r, 0);
        assert_eq!((ws.ws_col, ws.ws_row), (100, 30));
        let mut master = pty.master.try_clone().unwrap();
        master.write_all(b"hi\n").unwrap();
        let mut slave = File::from(pty.slave);
        let mut buf = [0u8; 16];
        let n = slave.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi\n");
        resize(&master, TtySize { cols: 40, rows: 10 }).unwrap();
    }
}
