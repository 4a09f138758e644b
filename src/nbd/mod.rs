//! NBD server (fixed newstyle) serving protected disks. (in progress)
